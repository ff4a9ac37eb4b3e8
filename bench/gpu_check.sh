#!/bin/sh
# Time each model pack's network on the GPU (PyTorch FP32 and FP16) against ONNX Runtime on the CPU and
# check that their outputs agree: one table (bench/gpu_check.py says how and with which tolerances).
#
# Needs: an NVIDIA GPU, Python with PyTorch, this repository, and gpu-carry/ made beforehand by
# bench/gpu_check_prepare.sh (ONNX Runtime reference outputs and wheels; no network is used here).
# Without CUDA the torch columns run on the CPU, with a note. Exit status 0 when every pack agreed.
#
#   sh bench/gpu_check.sh [CARRY_DIR]          PYTHON=python3.11 sh bench/gpu_check.sh
set -eu
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CARRY=${1:-gpu-carry}
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "gpu_check: $PYTHON cannot import torch; set PYTHON to the interpreter that has PyTorch" >&2
    exit 2
fi
# the script keeps to its own 240 s budget and prints the table; this is the backstop under 5 minutes
if command -v timeout >/dev/null 2>&1; then
    exec timeout 290 "$PYTHON" bench/gpu_check.py --carry "$CARRY"
fi
exec "$PYTHON" bench/gpu_check.py --carry "$CARRY"
