"""The whole package passes mypy; the TensorRT backend, which cannot run here, against TensorRT 10's stubs."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ["appliance/inference/backends/tensorrt.py", "appliance/inference/engine_cache.py"]


def _stubs() -> None:
    subprocess.run(["bash", str(REPO / "tools" / "tensorrt-stubs.sh")], check=True, cwd=REPO,
                   env=dict(os.environ, PYTHON=sys.executable))


def _mypy(*paths: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mypy", "--config-file", "mypy.ini", *paths],
                          capture_output=True, text=True, cwd=REPO)


def test_whole_package_passes_mypy():
    _stubs()
    run = _mypy("appliance")
    assert run.returncode == 0, run.stdout + run.stderr


def test_tensorrt_backend_passes_mypy_against_the_stubs():
    _stubs()
    run = _mypy(*TARGETS)
    assert run.returncode == 0, run.stdout + run.stderr


def test_mypy_would_catch_a_misused_tensorrt_call(tmp_path):
    _stubs()
    bad = REPO / "typings" / "_misuse_check.py"
    bad.write_text("import tensorrt as trt\n\ndef f(engine: trt.ICudaEngine) -> None:\n    engine.execute_v9()\n")
    try:
        run = _mypy(str(bad))
    finally:
        bad.unlink()
    assert run.returncode != 0 and "execute_v9" in run.stdout
