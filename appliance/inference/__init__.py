"""Model packs, inference backends (ONNX Runtime, TensorRT), engine building and the parity gate."""
