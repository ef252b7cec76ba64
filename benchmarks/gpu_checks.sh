#!/usr/bin/env bash
# Every check that needs a GPU, most important first (all of them take about 9 minutes on an H200):
#   1. the CUDA-only tests (offload and sleep free real device memory; images unchanged),
#   2. FLUX.1-dev at full size: diffusers, then our stages on the same weights per offload mode,
#      one request and a step batch of 4,
#   3. Qwen-Image through diffusers, Wan2.2-T2V-A14B through diffusers and our stages.
# Results go to $OUT (default benchmarks/results/gpu); each step has its own time limit, so a slow
# one costs only itself. STEPS="cuda_tests flux" runs only those. Python packages missing on the GPU
# machine travel as wheels in .whl/.
#     bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/client${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    [[ " ${STEPS:-$name} " == *" $name "* ]] || return 0
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    grep -E "passed|failed|error|family=|level [12]:" "$OUT/$name.log" | tail -12
}

step cuda_tests 180 python3 -m pytest -q -s -p no:cacheprovider -k "cuda or sleep_frees_device_memory" \
    tests/acceleration/test_offload.py tests/control/test_control_engine.py
step flux 240 python3 -m benchmarks.full_size --family flux --ours --repeats 2 --out "$OUT/full_size.csv"
step flux_batch4 240 python3 -m benchmarks.full_size --family flux --ours --batch 4 --repeats 1 \
    --out "$OUT/full_size.csv"
step qwen_image 150 python3 -m benchmarks.full_size --family qwen_image --repeats 1 --out "$OUT/full_size.csv"
step wan22_t2v 240 python3 -m benchmarks.full_size --family wan22_t2v --ours --steps 2 --repeats 1 \
    --out "$OUT/full_size.csv"
