"""Each model pack's network on the GPU (PyTorch FP32 and FP16) against ONNX Runtime on the CPU: one table.

Needs only PyTorch and this repository's files on the GPU machine (no onnx, no onnxruntime, no numpy, no
network). The networks are rebuilt from the training code that made them (training/*.py: only the torch
definitions are taken, so the training scripts' other imports need not be installed) and get their weights
from the pack's own engines/<id>/model.onnx, read by a small protobuf reader below; batch norm folded into
the convolutions by the ONNX export is folded the same way here.

Two modes:
  python bench/gpu_check.py --prepare [--carry gpu-carry]   here, with numpy + onnxruntime: takes the first
      inputs of each pack's calibration set, runs ONNX Runtime (CPU) on them, times it, and writes
      gpu-carry/reference.pt (inputs, reference outputs, timings, model hashes)
  python bench/gpu_check.py [--carry gpu-carry]              on the GPU machine (bench/gpu_check.sh)

ONNX Runtime on the GPU machine's CPU is used when it can run there: onnxruntime is installed, or a wheel for
that Python is in gpu-carry/wheels/ and numpy is installed. Otherwise the reference outputs and ORT-CPU
timings prepared here are used, and the table says so. Without CUDA the torch columns run on the CPU, with
a note, so the weight loading and agreement can be checked on any machine.

Agreement (stated tolerances): FP32 (TF32 off) within FP32_TOLERANCE of ONNX Runtime on every output; FP16
within the pack's own parity tolerance (manifest [precisions.tolerance] max_abs_diff, the gate its FP16
TensorRT engine must pass) on the decision output.
"""

from __future__ import annotations

import argparse
import ast
import atexit
import dataclasses
import hashlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
ENGINES = REPO / "engines"
CARRY = REPO / "gpu-carry"
REFERENCE_FILE = "reference.pt"
# max abs diff, every output. ONNX Runtime's own FP32 output of pancreas-localizer is 1.05e-3 from an FP64
# evaluation of the same weights (torch FP32 is 1.8e-6 from it): summation order. Wrong weights are far off:
# the same network with abdomen-pancreas's weights differs from it by 0.999.
FP32_TOLERANCE = 5e-3
BUDGET_SECONDS = 240.0  # the whole check; gpu_check.sh kills it at 290 s
TIMING_SECONDS = 2.0  # per measurement, after warm-up
# items per batch: what one inference call of the pipeline sees (chest: a stack of lung slices, 3-D: one volume)
BATCH = {"chest-covid19": 32, "lung-segmentation": 8, "pancreas-localizer": 1, "abdomen-pancreas": 8}


@dataclasses.dataclass(frozen=True)
class Network:
    """Where a pack's torch definition lives: the training file, the names to take from it, the class."""

    source: str
    names: tuple[str, ...]
    make: str


NETWORKS = {
    "chest-covid19": Network("training/chest_covid19.py", ("ChestNet",), "ChestNet"),
    "lung-segmentation": Network("training/lung_unet.py", ("CHANNELS", "_double_conv", "_up", "LungUNet"), "LungUNet"),
    "pancreas-localizer": Network("training/abdomen_pancreas.py", ("conv", "UNet3D"), "UNet3D"),
    "abdomen-pancreas": Network("training/abdomen_pancreas.py", ("conv", "UNet3D"), "UNet3D"),
}


class CheckFailed(Exception):
    """A pack could not be checked; ``reason_code`` is machine-readable, the message is for the table."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code


# ---- a minimal ONNX (protobuf) reader: initializers and nodes of ModelProto.graph -----------------------

@dataclasses.dataclass(frozen=True)
class OnnxNode:
    op_type: str
    inputs: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class OnnxGraph:
    initializers: dict[str, torch.Tensor]
    nodes: tuple[OnnxNode, ...]


ONNX_DTYPES = {1: torch.float32, 6: torch.int32, 7: torch.int64, 10: torch.float16, 11: torch.float64}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: an int, or a memoryview for bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise CheckFailed("ONNX_UNREADABLE", f"protobuf wire type {wire} at byte {pos}")
        yield number, wire, value


def _packed_varints(buf: memoryview) -> list[int]:
    values, pos = [], 0
    while pos < len(buf):
        value, pos = _varint(buf, pos)
        values.append(value - (1 << 64) if value >= 1 << 63 else value)
    return values


def _tensor(buf: memoryview) -> tuple[str, torch.Tensor | None]:
    """TensorProto -> (name, tensor); None for a data type or storage this reader does not handle."""
    dims: list[int] = []
    name, dtype, raw, floats, external = "", 0, None, bytearray(), False
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _packed_varints(value) if wire == 2 else [value]
        elif number == 2:
            dtype = value
        elif number == 4:
            floats += bytes(value)
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = bytearray(value)
        elif number == 14:
            external = value == 1
    if external or dtype not in ONNX_DTYPES:
        return name, None
    if raw is None and dtype == 1:
        raw = floats
    if raw is None:
        return name, None
    if not raw:  # an empty tensor
        return name, torch.zeros(dims, dtype=ONNX_DTYPES[dtype])
    return name, torch.frombuffer(raw, dtype=ONNX_DTYPES[dtype]).reshape(dims)


def _node(buf: memoryview) -> OnnxNode:
    op_type, inputs = "", []
    for number, _wire, value in _fields(buf):
        if number == 1:
            inputs.append(bytes(value).decode())
        elif number == 4:
            op_type = bytes(value).decode()
    return OnnxNode(op_type, tuple(inputs))


def read_onnx(path: Path) -> OnnxGraph:
    """The initializers (by name) and the nodes (in graph order) of an ONNX model file."""
    if sys.byteorder != "little":
        raise CheckFailed("BIG_ENDIAN_HOST", "ONNX raw tensor data is little-endian")
    model = memoryview(path.read_bytes())
    graph = next((value for number, _wire, value in _fields(model) if number == 7), None)
    if graph is None:
        raise CheckFailed("ONNX_UNREADABLE", f"{path.name} has no graph")
    initializers: dict[str, torch.Tensor] = {}
    nodes = []
    for number, _wire, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, tensor = _tensor(value)
            if tensor is not None:
                initializers[name] = tensor
    return OnnxGraph(initializers, tuple(nodes))


# ---- the networks, from the training code, with the ONNX file's weights -------------------------------

def _wanted(node: ast.stmt, names: tuple[str, ...]) -> bool:
    """A torch import, or the top-level definition of one of ``names``."""
    if isinstance(node, ast.Import):
        return all(alias.name.split(".")[0] == "torch" for alias in node.names)
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] in ("torch", "__future__")
    if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
        return node.name in names
    return isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets)


def _definitions(path: Path, names: tuple[str, ...]) -> dict[str, Any]:
    """Execute only the torch imports and the named top-level definitions of a training file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    body = [node for node in tree.body if _wanted(node, names)]
    namespace: dict[str, Any] = {"__name__": f"gpu_check.{path.stem}"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)  # the repository's code
    missing = [n for n in names if n not in namespace]
    if missing:
        raise CheckFailed("NETWORK_NOT_FOUND", f"{', '.join(missing)} not defined in {path.name}")
    return namespace


def build_network(pack_id: str) -> nn.Module:
    """A fresh torch module of the pack's architecture, as the training code defines it."""
    spec = NETWORKS.get(pack_id)
    if spec is None:
        raise CheckFailed("NO_TORCH_DEFINITION", f"no training code is known for pack {pack_id}")
    return _definitions(REPO / spec.source, spec.names)[spec.make]()


CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCE_NORM = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
# ONNX operator -> the torch modules it comes from, and which node inputs are (weight, bias, mean, var)
WEIGHTED_OPS: dict[str, tuple[tuple[type[nn.Module], ...], tuple[str, ...]]] = {
    "Conv": (CONV, ("weight", "bias")),
    "ConvTranspose": (CONV_T, ("weight", "bias")),
    "InstanceNormalization": (INSTANCE_NORM, ("weight", "bias")),
    "BatchNormalization": (BATCH_NORM, ("weight", "bias", "running_mean", "running_var")),
}


def _call_order(net: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """The weighted leaf modules in the order one forward pass calls them (= the exported graph's order)."""
    kinds = tuple(t for types, _ in WEIGHTED_OPS.values() for t in types)
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, _in, _out: order.append(module))
             for m in net.modules() if isinstance(m, kinds)]
    with torch.no_grad():
        net(example)
    for hook in hooks:
        hook.remove()
    return order


def _fold_batch_norm(net: nn.Module) -> None:
    """Batch norm -> identity: the eval-mode ONNX export folded it into the preceding convolution."""
    for parent in list(net.modules()):
        for name, child in parent.named_children():
            if isinstance(child, BATCH_NORM):
                setattr(parent, name, nn.Identity())


def _assign(module: nn.Module, attribute: str, value: torch.Tensor) -> None:
    current = getattr(module, attribute)
    if current is None:  # a folded convolution gains the bias batch norm had
        setattr(module, attribute, nn.Parameter(value.clone()))
        return
    if tuple(current.shape) != tuple(value.shape):
        raise CheckFailed("WEIGHT_SHAPE", f"{type(module).__name__}.{attribute} {tuple(current.shape)} "
                                          f"but the ONNX file has {tuple(value.shape)}")
    with torch.no_grad():
        current.copy_(value)


def load_onnx_weights(net: nn.Module, graph: OnnxGraph, example: torch.Tensor) -> nn.Module:
    """Copy every weight of the ONNX graph into ``net``, pairing weighted nodes with modules in call order."""
    net.eval()
    if not any(n.op_type == "BatchNormalization" for n in graph.nodes):
        _fold_batch_norm(net)
    modules = _call_order(net, example)
    nodes = [n for n in graph.nodes if n.op_type in WEIGHTED_OPS]
    if len(modules) != len(nodes):
        raise CheckFailed("LAYER_COUNT", f"the network calls {len(modules)} weighted layers, "
                                         f"the ONNX graph has {len(nodes)}")
    used: set[str] = set()
    for module, node in zip(modules, nodes):
        types, attributes = WEIGHTED_OPS[node.op_type]
        if not isinstance(module, types):
            raise CheckFailed("LAYER_KIND", f"{type(module).__name__} where the graph has {node.op_type}")
        for attribute, name in zip(attributes, node.inputs[1:]):
            if name not in graph.initializers:
                raise CheckFailed("WEIGHT_MISSING", f"{node.op_type} input {name} is not an initializer")
            _assign(module, attribute, graph.initializers[name])
            used.add(name)
    weights = {i for n in nodes for i in n.inputs[1:]}
    unused = sorted(set(graph.initializers) & weights - used)
    if unused:
        raise CheckFailed("WEIGHT_UNUSED", f"initializers not loaded: {', '.join(unused[:5])}")
    return net


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the reference: ONNX Runtime on the CPU -------------------------------------------------------------

def _manifest(pack: Path) -> dict[str, Any]:
    import tomllib

    return tomllib.loads((pack / "manifest.toml").read_text())


def _calibration_inputs(pack: Path, manifest: dict[str, Any], count: int) -> torch.Tensor:
    import numpy as np

    with np.load(pack / manifest["calibration"]["file"]) as data:
        return torch.from_numpy(np.ascontiguousarray(data["inputs"][:count]))  # float16 / int16 as stored


def ort_session(ort: Any, path: Path) -> Any:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(ort: Any, path: Path, input_name: str, x: torch.Tensor, seconds: float) -> tuple[dict, float]:
    """ONNX Runtime's outputs (name -> tensor) for ``x`` and its median milliseconds per call."""
    session = ort_session(ort, path)
    feed = {input_name: x.numpy()}
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, (torch.from_numpy(a) for a in session.run(None, feed))))
    return outputs, time_ms(lambda: session.run(None, feed), lambda: None, seconds)


def prepare_pack(ort: Any, pack: Path) -> dict[str, Any]:
    """Inputs, ONNX Runtime outputs and timing of one pack, with what the GPU run needs to know of it."""
    manifest = _manifest(pack)
    stored = _calibration_inputs(pack, manifest, BATCH.get(manifest["id"], 1))
    x = stored.float()
    tolerance = manifest.get("precisions", {}).get("tolerance", {}).get("max_abs_diff", 0.05)
    outputs, ms = ort_run(ort, pack / "model.onnx", manifest["input"]["name"], x, TIMING_SECONDS)
    return {"id": manifest["id"], "version": manifest["version"], "model_sha256": sha256(pack / "model.onnx"),
            "input_name": manifest["input"]["name"], "manifest_shape": list(manifest["input"]["shape"]),
            "decision_output": manifest["decision"]["output"], "fp16_tolerance": float(tolerance),
            "inputs": stored, "outputs": outputs, "ort_ms": ms}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prepare(carry: Path) -> Path:
    """Write ``carry/reference.pt``: every pack's inputs and ONNX Runtime reference, computed here."""
    import onnxruntime as ort

    packs = {}
    for pack in sorted(p.parent for p in ENGINES.glob("*/manifest.toml")):
        packs[pack.name] = prepare_pack(ort, pack)
        print(f"{pack.name}: inputs {tuple(packs[pack.name]['inputs'].shape)}, "
              f"ONNX Runtime {packs[pack.name]['ort_ms']:.1f} ms", flush=True)
    carry.mkdir(parents=True, exist_ok=True)
    target = carry / REFERENCE_FILE
    torch.save({"onnxruntime": ort.__version__, "cpu": cpu_name(), "threads": _cpu_count(),
                "python": platform.python_version(), "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "packs": packs}, target)
    return target


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_onnxruntime(carry: Path) -> tuple[Any, str]:
    """(the onnxruntime module or None, where it came from or why it cannot run here)."""
    try:
        import onnxruntime as ort

        return ort, f"onnxruntime {ort.__version__} installed here"
    except ImportError:
        pass
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = sorted((carry / "wheels").glob(f"onnxruntime-*-{tag}-{tag}-*x86_64*.whl"))
    if not wheels or platform.machine() != "x86_64":
        return None, f"no onnxruntime wheel for {tag} {platform.machine()} in {carry / 'wheels'}"
    try:
        import numpy  # noqa: F401 - onnxruntime needs it, and gpu-carry does not bring it
    except ImportError:
        return None, "numpy is not installed here (onnxruntime needs it)"
    target = Path(tempfile.mkdtemp(prefix="gpu-check-ort-"))
    atexit.register(shutil.rmtree, target, True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        wheel.extractall(target)
    sys.path.insert(0, str(target))
    try:
        import onnxruntime as ort
    except ImportError as error:
        return None, f"{wheels[-1].name} does not load: {error}"
    return ort, f"onnxruntime {ort.__version__} from {wheels[-1].name}"


# ---- timing and the comparison -------------------------------------------------------------------------

def time_ms(call: Callable[[], object], sync: Callable[[], None], seconds: float, warm_up: int = 3) -> float:
    """Median milliseconds of ``call`` over repeated runs for about ``seconds`` (at least 3 runs)."""
    for _ in range(warm_up):
        call()
    sync()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < 3 or (time.perf_counter() - start < seconds and len(samples) < 200):
        t0 = time.perf_counter()
        call()
        sync()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def _as_tuple(output: Any) -> tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


@dataclasses.dataclass
class Row:
    pack: str
    shape: str = ""
    batch: int = 0
    ort_ms: float | None = None
    fp32_ms: float | None = None
    fp16_ms: float | None = None
    fp32_diff: float | None = None
    fp16_diff: float | None = None
    fp16_tolerance: float | None = None
    agree: str = "no"
    note: str = ""


def run_precision(net: nn.Module, x: torch.Tensor, device: torch.device, dtype: torch.dtype,
                  seconds: float) -> tuple[tuple[torch.Tensor, ...], float]:
    """Outputs (float32, on the CPU) and median ms per batch of ``net`` in ``dtype`` on ``device``."""
    model = net.to(device=device, dtype=dtype)
    xd = x.to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        outputs = _as_tuple(model(xd))
        ms = time_ms(lambda: model(xd), sync, seconds)
    return tuple(o.float().cpu() for o in outputs), ms


def max_diffs(outputs: tuple[torch.Tensor, ...], reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference per output, the torch outputs taken in the ONNX outputs' order."""
    if len(outputs) != len(reference):
        raise CheckFailed("OUTPUT_COUNT", f"{len(outputs)} outputs, ONNX Runtime gave {len(reference)}")
    diffs = {}
    for (name, ref), out in zip(reference.items(), outputs):
        if tuple(ref.shape) != tuple(out.shape):
            raise CheckFailed("OUTPUT_SHAPE", f"{name} {tuple(out.shape)}, ONNX Runtime {tuple(ref.shape)}")
        diffs[name] = float((out - ref.float()).abs().max())
    return diffs


def _join(note: str, more: str) -> str:
    return f"{note}; {more}" if note else more


def _fp16(net: nn.Module, x: torch.Tensor, device: torch.device, reference: dict[str, torch.Tensor],
          seconds: float) -> tuple[tuple[torch.Tensor, ...], float | None, dict[str, torch.Tensor]]:
    """FP16 outputs, ms per batch and the matching reference. PyTorch's CPU FP16 kernels are reference code
    (tens of seconds per batch), so on the CPU FP16 runs once on the first items and is not timed."""
    if device.type == "cuda":
        outputs, ms = run_precision(net, x, device, torch.float16, seconds)
        return outputs, ms, reference
    n = min(2, len(x))
    model = net.to(dtype=torch.float16)
    with torch.inference_mode():
        outputs = tuple(o.float() for o in _as_tuple(model(x[:n].half())))
    return outputs, None, {name: ref[:n] for name, ref in reference.items()}


def check_pack(entry: dict[str, Any], device: torch.device, ort: Any, seconds: float) -> Row:
    """One row: the torch network with the pack's ONNX weights against ONNX Runtime, FP32 and FP16."""
    x = entry["inputs"].float()
    row = Row(entry["id"], "x".join(str(d) for d in x.shape[1:]), int(x.shape[0]),
              fp16_tolerance=entry["fp16_tolerance"])
    path = ENGINES / entry["id"] / "model.onnx"
    if sha256(path) != entry["model_sha256"]:
        raise CheckFailed("REFERENCE_STALE", "model.onnx changed since gpu_check_prepare.sh: run it again")
    reference, row.ort_ms = entry["outputs"], entry["ort_ms"]
    if ort is not None:
        reference, row.ort_ms = ort_run(ort, path, entry["input_name"], x, seconds)
    net = load_onnx_weights(build_network(entry["id"]), read_onnx(path), x[:1])
    out32, row.fp32_ms = run_precision(net, x, device, torch.float32, seconds)
    diffs32 = max_diffs(out32, reference)
    row.fp32_diff = diffs32[entry["decision_output"]]
    fp32_ok = max(diffs32.values()) <= FP32_TOLERANCE
    if not fp32_ok:
        worst = max(diffs32, key=lambda k: diffs32[k])
        row.note = f"FP32 {worst} differs by {diffs32[worst]:.2g} > {FP32_TOLERANCE:g}"
    try:
        out16, row.fp16_ms, reference = _fp16(net, x, device, reference, seconds)
    except RuntimeError as error:  # e.g. an FP16 kernel the CPU build lacks
        row.note = _join(row.note, f"FP16 not run: {str(error).splitlines()[0][:60]}")
        row.agree = "yes (FP32)" if fp32_ok else "no"
        return row
    if row.fp16_ms is None:
        row.note = _join(row.note, f"FP16 on the CPU: agreement on the first {len(out16[0])} of the batch, not timed")
    row.fp16_diff = max_diffs(out16, reference)[entry["decision_output"]]
    fp16_ok = row.fp16_diff <= entry["fp16_tolerance"]
    if not fp16_ok:
        row.note = _join(row.note, f"FP16 differs by {row.fp16_diff:.2g}")
    row.agree = "yes" if fp32_ok and fp16_ok else "no"
    return row


# ---- the table -----------------------------------------------------------------------------------------

COLUMNS = ("pack", "item shape", "batch", "ORT-CPU ms", "GPU FP32 ms", "GPU FP16 ms", "x FP32", "x FP16",
           "max|d| FP32", "max|d| FP16 (tol)", "agree")


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _diff(value: float | None, tolerance: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.1e}" + (f" ({tolerance:g})" if tolerance is not None else "")


def _speedup(reference: float | None, ms: float | None) -> str:
    return "-" if not reference or not ms else f"{reference / ms:.1f}"


def cells(row: Row) -> tuple[str, ...]:
    return (row.pack, row.shape, str(row.batch or "-"), _num(row.ort_ms), _num(row.fp32_ms, 2),
            _num(row.fp16_ms, 2), _speedup(row.ort_ms, row.fp32_ms), _speedup(row.ort_ms, row.fp16_ms),
            _diff(row.fp32_diff), _diff(row.fp16_diff, row.fp16_tolerance), row.agree)


def table(rows: list[Row], device_label: str) -> str:
    header = tuple(c.replace("GPU", device_label) for c in COLUMNS)
    grid = [header, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"  {r.pack}: {r.note}" for r in rows if r.note]
    return "\n".join(lines)


def pick_device(requested: str) -> tuple[torch.device, str, str]:
    """(device, its column label, a line describing it)."""
    if requested != "cpu" and torch.cuda.is_available():
        torch.backends.cudnn.allow_tf32 = False  # true FP32, so that FP32 can be compared at 1e-3
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda"), "GPU", f"GPU: {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}"
    if requested == "cuda":
        raise SystemExit("CUDA was asked for but torch.cuda.is_available() is False")
    return (torch.device("cpu"), "CPU",
            "NOTE: no CUDA device: the torch columns ran on the CPU (checks the weights, not GPU speed)")


def check_all(carry: Path, requested: str, budget: float) -> tuple[str, bool]:
    """The whole report and whether every pack agreed."""
    reference_path = carry / REFERENCE_FILE
    if not reference_path.is_file():
        return f"no {reference_path}: run sh bench/gpu_check_prepare.sh first (where PyPI is reachable)", False
    reference = torch.load(reference_path, weights_only=True)
    device, label, device_line = pick_device(requested)
    ort, ort_source = load_onnxruntime(carry)
    deadline = time.monotonic() + budget
    rows = []
    for pack_id, entry in reference["packs"].items():
        left = deadline - time.monotonic()
        if left < 10:
            rows.append(Row(pack_id, note="not run: the time budget was used up"))
            continue
        try:
            rows.append(check_pack(entry, device, ort, min(TIMING_SECONDS, left / 20)))
        except CheckFailed as problem:
            rows.append(Row(pack_id, note=str(problem)))
        except Exception as error:  # one pack's failure is that row's note; the rest still run
            rows.append(Row(pack_id, note=f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"))
    if ort is not None:
        ort_line = f"ORT-CPU: measured here on {_cpu_count()} threads of {cpu_name()} ({ort_source})"
    else:
        ort_line = (f"ORT-CPU: PREPARED, not measured here ({ort_source}): onnxruntime {reference['onnxruntime']} "
                    f"on {reference['threads']} threads of {reference['cpu']}, {reference['created']}; "
                    f"outputs compared with those reference outputs")
    head = [device_line, f"torch {torch.__version__}, Python {platform.python_version()}", ort_line,
            (f"tolerance: FP32 {FP32_TOLERANCE:g} on every output (TF32 off); FP16 the pack's parity max_abs_diff "
             f"on its decision output; batch = items per call; x = ORT-CPU ms / torch ms"), ""]
    report = "\n".join(head) + table(rows, label)
    return report, all(r.agree.startswith("yes") for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--carry", type=Path, default=CARRY, help="folder made by bench/gpu_check_prepare.sh")
    parser.add_argument("--prepare", action="store_true", help="write the ONNX Runtime reference (needs onnxruntime)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="seconds for the whole check")
    args = parser.parse_args(argv)
    if args.prepare:
        print(f"wrote {prepare(args.carry)}")
        return 0
    report, agreed = check_all(args.carry, args.device, args.budget)
    print(report, flush=True)
    return 0 if agreed else 1


if __name__ == "__main__":
    sys.exit(main())
