#!/bin/sh
# Fill gpu-carry/ (git-ignored) for bench/gpu_check.sh, here, where PyPI is reachable:
#   - reference.pt: each pack's first calibration inputs, ONNX Runtime's outputs for them and its CPU
#     timing on this machine (used on the GPU machine when ONNX Runtime cannot run there)
#   - wheels/: the onnxruntime wheel for CPython 3.10, 3.11 and 3.12 on manylinux x86-64, used on the GPU
#     machine when its Python has numpy (numpy itself is not carried: three of it would pass 64 MiB)
# Needs the repository's .venv with PyTorch (pip install torch==2.13.0). Prints the folder's size; fails
# above 64 MiB.
#
#   sh bench/gpu_check_prepare.sh [CARRY_DIR]     ORT_VERSION=1.23.2 PYTHON=.venv/bin/python
#   ORT_PYTHONS=3.11 sh bench/gpu_check_prepare.sh     only that Python's wheel (25 MiB in all)
#   ORT_PYTHONS= sh bench/gpu_check_prepare.sh         no wheels: the prepared reference only (9 MiB)
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CARRY=${1:-gpu-carry}
ORT_VERSION=${ORT_VERSION:-1.23.2}
ORT_PYTHONS=${ORT_PYTHONS-3.10 3.11 3.12}
LIMIT_MIB=64
mkdir -p "$CARRY/wheels"
rm -f "$CARRY"/wheels/onnxruntime-*.whl
for version in $ORT_PYTHONS; do
    "$PYTHON" -m pip download --quiet --disable-pip-version-check "onnxruntime==$ORT_VERSION" --no-deps \
        --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
        -d "$CARRY/wheels"
done
"$PYTHON" bench/gpu_check.py --prepare --carry "$CARRY"
ls -l "$CARRY" "$CARRY/wheels"
size_kib=$(du -sk "$CARRY" | cut -f1)
echo "$CARRY: $((size_kib / 1024)) MiB ($size_kib KiB; limit $LIMIT_MIB MiB)"
if [ "$size_kib" -gt $((LIMIT_MIB * 1024)) ]; then
    echo "gpu_check_prepare: $CARRY is larger than $LIMIT_MIB MiB" >&2
    exit 1
fi
