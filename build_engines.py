#!/usr/bin/env python3
"""Build the INT8 models, TensorRT engines and parity reports of every model pack in engines/.

Same as `appliance build-engines`. Without TensorRT or a GPU, the CPU artefacts (QDQ INT8 model,
parity on ONNX Runtime) are still built, and each skipped TensorRT engine is named with the reason.
"""

import sys

from appliance.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-engines", *sys.argv[1:]]))
