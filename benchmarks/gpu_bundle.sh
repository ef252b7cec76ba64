#!/usr/bin/env bash
# Packs, into .gpu/ (ignored by git), what a bare GPU machine lacks for benchmarks/gpu_checks.sh, from
# this checkout's .venv: the Python packages the machine's image does not hold (site.tar.xz), the
# tritonserver of the nvidia-pytriton wheel with its libraries and the Python 3.12 backend stub
# (triton.tar.xz), and, if given, a libpython3.12.so.1.0 for that stub on machines whose Python has no
# shared libpython (LIBPYTHON=/path/to/libpython3.12.so.1.0). xz keeps it all well under a device
# call's 64 MiB (the wheels as zip files would not fit).
#     bash benchmarks/gpu_bundle.sh
set -euo pipefail
SITE=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
GPU_PY=${GPU_PY:-3.12}  # the GPU machine's Python
mkdir -p .gpu
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# pure-Python packages at this checkout's versions; rapidjson is compiled, so fetched for the machine
for pkg in diffusers transformers ftfy wcwidth importlib_metadata tritonclient; do
    version=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$pkg'))")
    .venv/bin/pip download -q --no-deps --only-binary=:all: -d "$work/wheels" "$pkg==$version"
done
# numpy < 2 as nvidia-pytriton requires: the 2.51 backend stub builds its BYTES inputs with a numpy 1
# ABI, and under numpy 2 it reads every byte as the first one (its stub died on the first prompt)
for pkg in python-rapidjson "numpy==$(.venv/bin/python -c 'import numpy; print(numpy.__version__)')"; do
    .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$work/wheels" "$pkg"
done
for wheel in "$work"/wheels/*.whl; do unzip -q -o "$wheel" -d "$work/site"; done
tar -C "$work/site" -cf - . | xz -9 -T2 >.gpu/site.tar.xz
stubs=$(cd "$SITE" && ls -d pytriton/tritonserver/python_backend_stubs/* | grep -v "/$GPU_PY\$" | sed 's/^/--exclude=/')
# shellcheck disable=SC2086 # one --exclude per stub of another Python
tar -C "$SITE" -cf - $stubs --exclude='libpython3*' --exclude=__pycache__ pytriton/__init__.py \
    pytriton/tritonserver nvidia_pytriton.libs | xz -9 -T2 >.gpu/triton.tar.xz
if [[ -n "${LIBPYTHON:-}" ]]; then xz -9 -c "$LIBPYTHON" >.gpu/libpython.so.xz; fi
du -sh .gpu/*
