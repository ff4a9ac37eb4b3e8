"""bench/gpu_check.py on the CPU: the networks rebuilt from training/ with the weights read from the packs'
ONNX files by its own protobuf reader agree with ONNX Runtime.

PyTorch is an optional extra (``pip install torch==2.13.0``, pyproject's ``training``); without it these
tests skip.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed (optional extra: pip install torch==2.13.0)")
pytestmark = pytest.mark.slow  # ONNX Runtime and PyTorch on real pack inputs: about 20 s in all

REPO = Path(__file__).resolve().parents[1]
PACK = REPO / "engines" / "abdomen-pancreas"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _gpu_check()


def test_the_protobuf_reader_reads_every_initializer_as_onnx_does():
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    path = REPO / "engines" / "lung-segmentation" / "model.onnx"
    graph = gpu_check.read_onnx(path)
    model = onnx.load(str(path))
    expected = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(graph.initializers) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(graph.initializers[name].numpy(), array)
    assert [n.op_type for n in graph.nodes] == [n.op_type for n in model.graph.node]


def test_folded_batch_norm_network_agrees_with_onnx_runtime():
    """chest-covid19's export folded batch norm into its bias-free convolutions: the loader folds it too."""
    import onnxruntime as ort

    pack = REPO / "engines" / "chest-covid19"
    x = torch.from_numpy(np.load(pack / "calibration.npz")["inputs"][:4].astype(np.float32))
    net = gpu_check.load_onnx_weights(gpu_check.build_network("chest-covid19"),
                                      gpu_check.read_onnx(pack / "model.onnx"), x[:1])
    reference, _ms = gpu_check.ort_run(ort, pack / "model.onnx", "image", x, 0.0)
    outputs, _ms = gpu_check.run_precision(net, x, torch.device("cpu"), torch.float32, 0.0)
    diffs = gpu_check.max_diffs(outputs, reference)
    assert set(diffs) == {"probability", "cam"}
    assert max(diffs.values()) <= gpu_check.FP32_TOLERANCE


def test_one_pack_row_agrees_in_fp32_and_fp16():
    import onnxruntime as ort

    entry = gpu_check.prepare_pack(ort, PACK)
    row = gpu_check.check_pack(entry, torch.device("cpu"), None, 0.0)
    assert row.agree == "yes", row.note
    assert row.fp32_diff is not None and row.fp32_diff <= gpu_check.FP32_TOLERANCE
    assert row.fp16_diff is not None and row.fp16_diff <= entry["fp16_tolerance"] == 0.2
    assert row.ort_ms is not None and row.ort_ms > 0 and row.fp32_ms is not None and row.fp32_ms > 0
    assert "abdomen-pancreas" in gpu_check.table([row], "CPU")


def test_weights_of_another_network_are_refused_with_a_reason():
    graph = gpu_check.read_onnx(REPO / "engines" / "chest-covid19" / "model.onnx")
    with pytest.raises(gpu_check.CheckFailed) as caught:
        gpu_check.load_onnx_weights(gpu_check.build_network("abdomen-pancreas"), graph,
                                    torch.zeros(1, 1, 24, 32, 80))
    assert caught.value.reason_code in {"LAYER_COUNT", "LAYER_KIND", "WEIGHT_SHAPE"}


def test_a_changed_model_file_makes_the_reference_stale():
    import onnxruntime as ort

    entry = gpu_check.prepare_pack(ort, PACK)
    entry["model_sha256"] = "0" * 64
    with pytest.raises(gpu_check.CheckFailed, match="REFERENCE_STALE"):
        gpu_check.check_pack(entry, torch.device("cpu"), None, 0.0)


def test_the_table_is_printed_when_nothing_was_prepared(tmp_path):
    report, agreed = gpu_check.check_all(tmp_path, "cpu", 10.0)
    assert not agreed
    assert "gpu_check_prepare.sh" in report


def test_without_onnx_runtime_the_prepared_reference_is_used_and_said(tmp_path, monkeypatch):
    """The GPU machine without numpy/onnxruntime: outputs are compared with the reference made here."""
    import onnxruntime as ort

    entry = gpu_check.prepare_pack(ort, PACK)
    torch.save({"onnxruntime": ort.__version__, "cpu": "test CPU", "threads": 2, "python": "3.x",
                "created": "now", "packs": {entry["id"]: entry}}, tmp_path / gpu_check.REFERENCE_FILE)
    monkeypatch.setattr(gpu_check, "load_onnxruntime", lambda carry: (None, "no onnxruntime wheel for this test"))
    report, agreed = gpu_check.check_all(tmp_path, "cpu", 60.0)
    assert agreed, report
    assert "ORT-CPU: PREPARED, not measured here (no onnxruntime wheel for this test)" in report
    row = next(line for line in report.splitlines() if line.startswith("abdomen-pancreas "))
    assert row.split()[-1] == "yes" and f"{entry['ort_ms']:.1f}" in row
