"""Share a trained DFN checkpoint (or LoRA adapter) on the Hugging Face Hub.

Assembles a self-contained repo folder from a training output folder — weights (safetensors), config.json with
auto_map, the *_dfn.py code files, tokenizer files, generation_config.json, plots, training_summary.json and a
README.md model card rendered from the run's own numbers — checks that it loads offline in a fresh process that
cannot import `dfn` (trust_remote_code=True, a few generated tokens), then uploads it with `HfApi.upload_folder`
(never `model.push_to_hub`, which would replace the card).

    # look first: build the folder, verify it, print the file list and the card; no network, no token
    python scripts/push_to_hub.py --source outputs/tiny --repo-id you/dfn-tiny-shakespeare --out hub/dfn-tiny --dry-run

    # push (token from HF_TOKEN or `hf auth login`)
    python scripts/push_to_hub.py --source outputs/tiny --repo-id you/dfn-tiny-shakespeare --private

    # a LoRA adapter, on a branch; --base-source is a local copy of the base model used for the offline check
    python scripts/push_to_hub.py --source outputs/lora --repo-id you/dfn-tiny-lora \
        --base-model you/dfn-tiny-shakespeare --base-source outputs/tiny --revision v1
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from dfn.hub import (
    HubError,
    assemble,
    check_repo_id,
    default_commit_message,
    human_size,
    inspect_source,
    prepare_out,
    read_json,
    redact,
    resolve_token,
    upload,
    verify_loads,
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", required=True, help="training output folder (saved model) or PEFT adapter folder")
    p.add_argument("--repo-id", required=True, help="target Hub repo, USER/NAME")
    p.add_argument(
        "--private", action="store_true", help="create the repo as private (an existing repo keeps its visibility)"
    )
    p.add_argument("--revision", help="branch to push to (created if missing); default: main")
    p.add_argument("--commit-message", help="default: summarises the run (dataset, val bpb)")
    p.add_argument(
        "--out",
        help="folder to assemble the repo in (must be empty unless --overwrite); "
        "default: a temporary folder (kept with --dry-run)",
    )
    p.add_argument("--overwrite", action="store_true", help="empty a non-empty --out first")
    p.add_argument("--dry-run", action="store_true", help="assemble and verify, print files and card, upload nothing")
    p.add_argument("--token", help="Hub token (prefer HF_TOKEN or `hf auth login`: arguments show up in `ps`)")
    p.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    p.add_argument("--base-model", help="adapters: Hub repo id of the base DFN model (written to adapter_config.json)")
    p.add_argument(
        "--base-source",
        help="adapters: local folder of the base model for the offline load check "
        "(default: the adapter's base_model_name_or_path when it is a local folder)",
    )
    p.add_argument("--license", help="license id for the card (default: the dfn package's license)")
    p.add_argument("--language", default="en", help="language of the training text (default: en)")
    p.add_argument("--dataset-id", help="Hub dataset id for the card (default: from training_summary.json)")
    return p.parse_args(argv)


def _base_source(args, source) -> Path:
    """The local base model folder used to verify an adapter offline."""
    candidate = args.base_source or source.config.get("base_model_name_or_path")
    if candidate and Path(candidate).expanduser().is_dir():
        base = inspect_source(candidate)
        if base.kind != "model":
            raise HubError(f"--base-source {candidate} is not a saved DFN model folder")
        return base.path
    raise HubError(
        "cannot check the adapter offline: its base model "
        f"({candidate!r}) is not a local folder; pass --base-source FOLDER (a local copy of the base model)"
    )


def run(args: argparse.Namespace) -> int:
    check_repo_id(args.repo_id)
    token = None if args.dry_run else resolve_token(args.token)  # fail before any slow step
    args.resolved_token = token
    source = inspect_source(args.source)
    base_folder, base_config = None, None
    if source.kind == "adapter":
        if not args.base_model:
            raise HubError("an adapter needs --base-model USER/NAME: the Hub repo id of the base DFN model")
        check_repo_id(args.base_model, "--base-model")
        base_folder = _base_source(args, source)
        base_config = read_json(base_folder / "config.json")

    temporary = args.out is None
    out = (
        Path(tempfile.mkdtemp(prefix="dfn-hub-"))
        if temporary
        else prepare_out(args.out, source.path, args.overwrite, base_folder)
    )
    try:
        files, card, notes = assemble(
            source,
            out,
            repo_id=args.repo_id,
            base_model=args.base_model,
            revision=args.revision,
            license=args.license,
            language=args.language,
            dataset_id=args.dataset_id,
            base_config=base_config,
        )
        for note in notes:
            print(f"note: {note}")
        print(f"assembled {out} ({source.kind}):")
        for name in files:
            print(f"  {name:<32} {human_size((out / name).stat().st_size):>10}")

        print("verifying: loading the folder offline in a fresh process without the dfn package ...", flush=True)
        result = verify_loads(out, base_folder=base_folder)
        print(f"  ok: {result['model_class'].rsplit('.', 1)[-1]} generated {result['generated_text']!r}")

        if args.dry_run:
            print("\n----- README.md -----")
            print(card.content)
            print("----- end of README.md -----")
            print(f"dry run: nothing uploaded; the folder is {out}")
            return 0

        commit_message = args.commit_message or default_commit_message(source)
        print(f"uploading to {args.repo_id}" + (f" (branch {args.revision})" if args.revision else "") + " ...")
        info = upload(
            out,
            repo_id=args.repo_id,
            token=token,
            private=args.private,
            revision=args.revision,
            commit_message=commit_message,
            endpoint=args.endpoint,
        )
        print(f"done: {getattr(info, 'commit_url', None) or args.repo_id}")
        return 0
    finally:
        if temporary and not args.dry_run:
            shutil.rmtree(out, ignore_errors=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except Exception as e:
        secret = getattr(args, "resolved_token", None) or args.token or os.environ.get("HF_TOKEN")
        return report(e, secret)


def report(e: Exception, secret: str | None) -> int:
    if isinstance(e, HubError):
        print(f"error: {redact(str(e), secret)}", file=sys.stderr)
        return 2
    # e.g. an HTTP error from the Hub: report it without a traceback, which could show the token in a frame
    print(f"error: {type(e).__name__}: {redact(str(e), secret)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
