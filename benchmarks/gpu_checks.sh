#!/usr/bin/env bash
# Every check that needs a GPU, most important first (all of them take about 9 minutes on an H200):
#   1. the CUDA-only tests (offload and sleep free real device memory; images unchanged),
#   2. FLUX.1-dev at full size: diffusers, then our stages on the same weights per offload mode,
#      one request and a step batch of 4,
#   3. Qwen-Image through diffusers, Wan2.2-T2V-A14B through diffusers and our stages,
#   4. step-level batching through tritonserver (benchmarks/step_batching.py, FLUX.1's block width),
#   5. not in the default run: step-level batching without background decoding (step_batching_inline),
#      where the engine's time goes under that load, in process (engine_profile),
#      Wan2.2's resident and layerwise offload rows alone (wan22_layerwise; step 3 has them), the offload
#      tests alone (offload_cuda), and the parallel-modes benchmark on this machine's quiet cores plus its
#      single-GPU loop (parallel).
# Results go to $OUT (default benchmarks/results/gpu); each step has its own time limit, so a slow
# one costs only itself. STEPS="cuda_tests flux" runs only those. What the GPU machine lacks travels
# in .gpu/ (packed here by benchmarks/gpu_bundle.sh): Python packages and the tritonserver of the
# nvidia-pytriton wheel, unpacked to /tmp/site.
#     bash benchmarks/gpu_checks.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [[ -f .gpu/site.tar.xz ]]; then
    mkdir -p /tmp/site
    for bundle in .gpu/site.tar.xz .gpu/triton.tar.xz; do [[ -f $bundle ]] && tar -C /tmp/site -xJf "$bundle"; done
    # numpy < 2 only where OMNI_NUMPY1 is set (the tritonserver step): Triton 2.51's backend stub copies
    # its input tensors through a numpy 1 ABI (under numpy 2 every byte reads as the first one), while
    # the machine's scipy needs numpy 2 (np.long): with numpy 1 it is hidden (diffusers and transformers
    # import it only if present), and peft with it
    mkdir -p /tmp/np1 && mv /tmp/site/numpy /tmp/site/numpy-*.dist-info /tmp/site/numpy.libs /tmp/np1/ 2>/dev/null
    export PYTHONPATH=/tmp/site
    # tritonserver's backend stubs did not see PYTHONPATH there: a .pth file reaches every interpreter
    # that uses this Python's site-packages, and puts the carried packages first
    cat >"$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/omni_gpu_site.pth" <<'PTH'
import sys; sys.path.insert(0, "/tmp/site")
import os, sys; os.environ.get("OMNI_NUMPY1") and (sys.path.insert(0, "/tmp/np1") or sys.modules.update(scipy=None, peft=None))
PTH
fi
# The backend stub loads the shared libpython of the machine's Python; where there is none (a static
# build), use the carried one.
libpython=$(python3 -c "import sysconfig as s; print('libpython' + s.get_config_var('VERSION') + '.so.1.0')")
if ! python3 -c "import os, sysconfig as s; os.stat(os.path.join(s.get_config_var('LIBDIR'), '$libpython'))" \
    2>/dev/null && [[ -f .gpu/libpython.so.xz ]]; then
    mkdir -p /tmp/pylib
    xz -dc .gpu/libpython.so.xz >"/tmp/pylib/$libpython"
    export LD_LIBRARY_PATH=/tmp/pylib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export PYTHONPATH=$PWD:$PWD/client${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

DEFAULT_STEPS="cuda_tests flux flux_batch4 qwen_image wan22_t2v step_batching"
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    [[ " ${STEPS:-$DEFAULT_STEPS} " == *" $name "* ]] || return 0
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    grep -E "passed|failed|error|family=|level [12]:|req/s|Throughput" "$OUT/$name.log" | tail -12
}

step cuda_tests 180 python3 -m pytest -q -s -p no:cacheprovider -k "cuda or sleep_frees_device_memory" \
    tests/acceleration/test_offload.py tests/control/test_control_engine.py tests/engine/test_engine.py
step flux 240 python3 -m benchmarks.full_size --family flux --ours --repeats 2 --out "$OUT/full_size.csv"
step flux_batch4 240 python3 -m benchmarks.full_size --family flux --ours --batch 4 --repeats 1 \
    --out "$OUT/full_size.csv"
step qwen_image 150 python3 -m benchmarks.full_size --family qwen_image --repeats 1 --out "$OUT/full_size.csv"
step wan22_t2v 240 python3 -m benchmarks.full_size --family wan22_t2v --ours --steps 2 --repeats 1 \
    --out "$OUT/full_size.csv"
# SB_SIZES: 512 and 1024 (2026-11-26) left one 1024 request nearly filling the H200 at this width
step_batching() {  # step_batching NAME BACKGROUND_DECODE
    mkdir -p "$OUT/$1"
    step "$1" "${SB_LIMIT:-330}" env OMNI_NUMPY1=1 python3 -m benchmarks.step_batching --checkpoint wide --device cuda \
        --dtype bfloat16 --sizes ${SB_SIZES:-256 512} --warmup 8 --requests "${SB_REQUESTS:-48}" --quiet-wait 5 \
        --rounds "${SB_ROUNDS:-1}" --background-decode "$2" --out "$OUT/$1" --server-log "$OUT/$1/server.log"
}
step_batching step_batching auto
step_batching step_batching_inline false  # the same without background decoding (not in the default run)
# where the engine's time goes, in process: the same load, each mode's host phases and device share (not default)
step engine_profile 240 env OMNI_NUMPY1=1 python3 -m benchmarks.engine_profile --checkpoint wide --device cuda --dtype bfloat16 \
    --sizes ${SB_SIZES:-256 512} --modes ${EP_MODES:-none request step}
step wan22_layerwise 270 python3 -m benchmarks.full_size --family wan22_t2v --ours --offload none layerwise \
    --steps 2 --repeats 1 --out "$OUT/full_size.csv"
step offload_cuda 120 python3 -m pytest -q -s -p no:cacheprovider -k cuda tests/acceleration/test_offload.py
step parallel 240 python3 -m benchmarks.parallel --gpu --out "$OUT/parallel.json"
