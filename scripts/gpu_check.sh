#!/usr/bin/env bash
# The GPU checks and measurements for a machine with a CUDA GPU (and a Python that has CUDA torch), in parts:
#   PARTS="main decode" bash scripts/gpu_check.sh [OUT_DIR] [TRAIN_BUDGET_S]
# main (about 6 minutes with the default budget: 369 s on an H200):
#   1. the scaling benchmark on the GPU, 1k .. 1M bytes, alone on the GPU (its timings are reported);
#   2. the GPU preset of the quality comparison (nanoGPT shakespeare_char: 6 layers, 384 wide, context 256, batch 64;
#      DFN and Llama side by side, bf16), fitted into TRAIN_BUDGET_S seconds per run, in the background;
#   3. meanwhile, CUDA correctness: tests/test_device.py (every check against the CPU), compiled decoding on CUDA
#      (tests/test_compile.py) and the Triton kernel mix (tests/test_mix_triton.py).
# decode (not yet run; stage limits 7 minutes in all): decoding latency at 1k and 128k context, eager with the Triton
#   mix and compiled.
# Each stage has a time limit; a stage that fails or runs out leaves its log (and partial results) in OUT_DIR.
set -u
OUT=${1:-outputs/gpu_check}
TRAIN_BUDGET_S=${2:-200}
PARTS=${PARTS:-main decode}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

stage() {  # stage NAME SECONDS COMMAND...: runs COMMAND under a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start))s"
}

nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.version.cuda, torch.cuda.get_device_name())"

if [[ " $PARTS " == *" main "* ]]; then
    stage benchmark 180 $PY scripts/benchmark.py --device cuda --lengths 1024,4096,16384,65536,262144,1048576 \
        --train-max-length 262144 --decode-steps 32 --baseline-time-cap 30 --baseline-mem-cap 100 --out-dir "$OUT" --overwrite
    tail -n 30 "$OUT/benchmark.log"

    stage compare $((TRAIN_BUDGET_S + 90)) $PY scripts/compare.py --preset gpu --contexts 256 --variants dfn llama \
        --jobs 2 --bf16 --time_budget_s "$TRAIN_BUDGET_S" --output_dir "$OUT/compare" --overwrite &
    train=$!

    stage tests 240 $PY -m pytest -q tests/test_device.py tests/test_compile.py tests/test_mix_triton.py -k "cuda or triton"
    tail -n 5 "$OUT/tests.log"

    wait $train
    tail -n 20 "$OUT/compare.log"
fi

if [[ " $PARTS " == *" decode "* ]]; then
    for context in 1024 131072; do
        spec="{\"kind\": \"dfn\", \"mode\": \"decode\", \"length\": $context}"
        stage "decode_triton_$context" 60 $PY scripts/benchmark.py --device cuda --mix-kernel triton \
            --decode-steps 64 --worker "$spec"
        tail -n 1 "$OUT/decode_triton_$context.log"
        stage "decode_compiled_$context" 150 $PY scripts/benchmark.py --device cuda --compile-decoding \
            --decode-steps 64 --worker "$spec"
        tail -n 1 "$OUT/decode_compiled_$context.log"
    done
fi
