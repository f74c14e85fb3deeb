#!/usr/bin/env bash
# Download the wheels the device machine lacks (wheels.txt) into .whl/ at the repo root, for its Python.
#   bash benchmarks/gpu/fetch_wheels.sh            # Python 3.12, the device image's
#   bash benchmarks/gpu/fetch_wheels.sh 3.11 DIR   # another Python / folder (to try the set on this machine)
# Needs network access to PyPI and the project venv (.venv, made by `make test`: its torch builds DeepSpeed's wheel);
# run it here, then carry .whl (see run_checks.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY_VERSION="${1:-3.12}"
DEST="${2:-.whl}"
PIP="${PIP:-.venv/bin/pip}"
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
mapfile -t PINS < <(grep -v -e '^#' -e '^$' benchmarks/gpu/wheels.txt | grep -v '^deepspeed==')
"$PIP" download --quiet --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d "$DEST" "${PINS[@]}"
# DeepSpeed ships as a source distribution only; DS_BUILD_OPS=0 builds a pure-Python wheel (needs torch here).
DEEPSPEED="$(grep '^deepspeed==' benchmarks/gpu/wheels.txt)"
SDIST="$(mktemp -d)"
"$PIP" download --quiet --no-deps --no-binary=:all: -d "$SDIST" "$DEEPSPEED"
DS_BUILD_OPS=0 "$PIP" wheel --quiet --no-deps --no-build-isolation -w "$DEST" "$SDIST"/deepspeed-*.tar.gz
rm -rf "$SDIST"
ls -1 "$DEST"
du -sh "$DEST"
