"""The small 2-D lung U-Net of ``lung-unet-small``, rebuilt from its state dict, and its ONNX export.

Layout read from the state dict keys: three encoder blocks ``conv1..conv3`` and a ``middle`` block, each
two 3x3 conv + batch norm + ReLU (16-32-64-128 channels) with 2x2 max pooling between them; three
decoder steps ``upsampleN`` (3x3 transposed conv, stride 2, output padding 1) whose output is concatenated
with the encoder block of the same scale (upsampled first) and refined by ``upconvN`` (two conv + BN + ReLU);
``final`` is a 1x1 conv, then a sigmoid. Input: stored pixel values (HU + 1024), no scaling.

Needs PyTorch (an optional training extra; the appliance never imports it):
    python -m training.lung_unet --check      # rebuild, export model.onnx, compare with the reference export
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

SHARED = Path(os.environ.get("APPLIANCE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOURCE = SHARED / "models" / "lung-unet-small"
STATE_DICT = "UNet_wdk24.pt"
REFERENCE_ONNX = "UNet_wdk24.onnx"
CHANNELS = (16, 32, 64, 128)
OPSET = 17


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _up(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1, output_padding=1)


class LungUNet(nn.Module):
    """Lung probability (N, 1, H, W) from stored pixel values (N, 1, H, W); H and W multiples of 8."""

    def __init__(self) -> None:
        super().__init__()
        c1, c2, c3, c4 = CHANNELS
        self.conv1, self.conv2, self.conv3 = _double_conv(1, c1), _double_conv(c1, c2), _double_conv(c2, c3)
        self.maxpool1, self.maxpool2, self.maxpool3 = (nn.Sequential(nn.MaxPool2d(2)) for _ in range(3))
        self.middle = _double_conv(c3, c4)
        self.upsample3, self.upconv3 = _up(c4, c3), _double_conv(2 * c3, c3)
        self.upsample2, self.upconv2 = _up(c3, c2), _double_conv(2 * c2, c2)
        self.upsample1, self.upconv1 = _up(c2, c1), _double_conv(2 * c1, c1)
        self.final = nn.Conv2d(c1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.conv1(x)
        e2 = self.conv2(self.maxpool1(e1))
        e3 = self.conv3(self.maxpool2(e2))
        m = self.middle(self.maxpool3(e3))
        d3 = self.upconv3(torch.cat([self.upsample3(m), e3], dim=1))
        d2 = self.upconv2(torch.cat([self.upsample2(d3), e2], dim=1))
        d1 = self.upconv1(torch.cat([self.upsample1(d2), e1], dim=1))
        return torch.sigmoid(self.final(d1))


def load(source: Path = SOURCE) -> LungUNet:
    """The network with the published weights, in evaluation mode (batch norm uses running statistics)."""
    net = LungUNet()
    state = torch.load(source / STATE_DICT, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def export(net: LungUNet, path: Path) -> None:
    """ONNX, opset 17: input ``x`` [batch, 1, height, width] float32, output ``prob`` of the same shape.

    Batch, height and width are dynamic (any multiple of 8): the appliance runs 256x256 inputs, the
    reference export took 512x512, and the same graph serves both.
    """
    dummy = torch.zeros(1, 1, 256, 256)
    axes = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(net, (dummy,), str(path), input_names=["x"], output_names=["prob"], opset_version=OPSET,
                      dynamic_axes={"x": axes, "prob": axes}, dynamo=False)


def reference_slices(count: int = 4, seed: int = 0) -> np.ndarray:
    """(count, 1, 512, 512) stored pixel values for the parity check: real CT slices when the shared series
    is there, else random air/soft-tissue noise."""
    real = SHARED / "ct" / "tcia-pancreas-ct-chest-abdomen"
    files = sorted(real.glob("*.dcm")) if real.is_dir() else []
    if files:
        import pydicom

        picks = np.linspace(len(files) * 0.2, len(files) - 1, count).astype(int)
        arrays = [pydicom.dcmread(files[k]).pixel_array.astype(np.float32) for k in picks]
        return np.stack(arrays)[:, None]
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1100, size=(count, 1, 512, 512)).astype(np.float32)


def max_abs_diff(ours: Path, reference: Path, x: np.ndarray) -> float:
    """Largest absolute difference of the two ONNX models' outputs on ``x`` (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    a = ort.InferenceSession(str(ours), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    return float(np.abs(a.run(None, {"x": x})[0] - b.run(None, {b.get_inputs()[0].name: x})[0]).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("training/out/lung-segmentation/model.onnx"))
    parser.add_argument("--check", action="store_true", help="compare with the reference ONNX export")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    net = load()
    export(net, args.out)
    print(f"wrote {args.out}")
    if args.check:
        x = reference_slices()
        with torch.no_grad():
            torch_diff = float(np.abs(net(torch.from_numpy(x)).numpy()
                                      - _ort(args.out, x)).max())
        print(f"max abs diff vs {REFERENCE_ONNX}: {max_abs_diff(args.out, SOURCE / REFERENCE_ONNX, x):.3g}; "
              f"PyTorch vs our export: {torch_diff:.3g}")


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


if __name__ == "__main__":
    main()
