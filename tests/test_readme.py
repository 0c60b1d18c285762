"""The README's usage snippet runs and its assertions hold, so it never rots."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_snippet_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    snippet = next(block for block in blocks if "DFNForCausalLM(config)" in block)
    exec(compile(snippet, str(README), "exec"), {})
