#!/usr/bin/env python3
"""Build inference engines for every model pack in engines/.

Lists the packs found; engine building (TensorRT FP16/INT8 and ONNX Runtime INT8) is part of the
inference runtime and reports here what it builds and skips.
"""

import sys
from pathlib import Path

ENGINES = Path(__file__).resolve().parent / "engines"


def main() -> int:
    packs = sorted(p for p in ENGINES.iterdir() if (p / "model.onnx").exists())
    if not packs:
        print(f"no model packs in {ENGINES}: nothing to build")
        return 0
    print("model packs found:", ", ".join(p.name for p in packs))
    print("engine building is not available in this version: packs run on ONNX Runtime (CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
