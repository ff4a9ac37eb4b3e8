#!/usr/bin/env bash
# Prepare TensorRT type stubs for mypy in ./typings (TensorRT itself cannot be installed here).
# tensorrt-stubs is installed without its dependencies (they would pull TensorRT's download stubs),
# copied into a stub folder and patched for two syntax errors of the generated file.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
STUBS_VERSION=10.13.0.35.1
target=typings
[ -f "$target/tensorrt_bindings/tensorrt.pyi" ] && exit 0
tmp=$(mktemp -d)
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" "tensorrt-stubs==$STUBS_VERSION"
mkdir -p "$target"
cp -r "$tmp/tensorrt" "$tmp/tensorrt_bindings" "$target/"
sed -i -E 's/([(,] *)in: /\1in_: /g' "$target/tensorrt_bindings/tensorrt.pyi"
sed -i -E 's/(def add_scale_nd\(.*)channel_axis: int\)/\1channel_axis: int = ...)/' "$target/tensorrt_bindings/tensorrt.pyi"
rm -rf "$tmp"
