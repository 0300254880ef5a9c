"""Helpers several test modules share (tests import them from here, never from each other)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from torch import nn

from deploy.recipe import ExportConfig
from deploy.runtimes.ort import OrtCpu
from deploy.stages.export_onnx import export

BAD = "/c2/Conv"


class BadLayerNet(nn.Module):
    """Four 3x3 convs and a classifier on 64x64 inputs. c1's channel 0 is dead (always 0 after its ReLU) and c2
    reads it with weights 50: the fp32 function does not change, but each of c2's per-channel weight scales
    is set by that 50, so int8 rounds c2's real weights (about 0.1) to 0 or +-0.4."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 16, 3, 2, 1)
        self.c3, self.c4 = nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 32, 3, 2, 1)
        self.fc = nn.Linear(32 * 4 * 4, 10)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.c1.bias[0] = -100.0
            self.c2.weight[:, 0] = 0.0
            self.c2.weight[:, 0, 1, 1] = 50.0

    def forward(self, x):
        for conv in (self.c1, self.c2, self.c3, self.c4):
            x = torch.relu(conv(x))
        return self.fc(x.flatten(1))


def bad_layer_onnx(path: Path) -> Path:
    torch.manual_seed(0)
    torch.onnx.export(BadLayerNet().eval(), torch.zeros(1, 3, 64, 64), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)  # fmt: skip
    return path


def images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 64, 64)).astype(np.float32)


def assert_runs_and_exports(pruned, tmp_path, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The pruned 1000-class model runs, exports to ONNX and ORT gives PyTorch's logits; returns (input, logits)."""
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        y = pruned(x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    export(pruned, tmp_path / "p.onnx", ExportConfig(simplify=False), size)
    got = OrtCpu(tmp_path / "p.onnx").infer(x.numpy())
    assert abs(got - y.numpy()).max() < 1e-4 * max(1.0, float(y.abs().max()))  # the export stage's own gate
    return x, y


def is_plot(path: Path) -> bool:
    """A PNG that Pillow decodes, of a plot's size (not an empty or broken file)."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.format == "PNG" and min(img.size) >= 100


def bomb_png(width: int, height: int) -> bytes:
    """A 1-bit grayscale PNG of zeros written by hand: a few KB whatever its size (12000x12000: 18 KB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    row, z = b"\0" * (1 + (width + 7) // 8), zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def small_build(root: Path, int8: bool = True, *args: str, **overrides) -> Path:
    """A real `deploy build` output in root/build: MobileNetV3-Small, 3 classes, random weights saved as a
    checkpoint, 64 px, fp32 (+ int8), built-in calibration photos; `args` go to `deploy build`, `overrides` (dotted
    recipe paths) to the recipe."""
    import yaml

    from deploy import models
    from deploy import recipe as recipes
    from deploy.cli import main

    torch.manual_seed(0)
    r = recipes.override(recipes.load("mobilenet_v3_small"), {
        "model.num_classes": 3, "preprocess.resize": 72, "preprocess.input_size": 64, "quantize.enabled": int8,
        "quantize.calibration.samples": 16, "verify.heldout": 8, "verify.latency.runs": 3, "verify.latency.warmup": 1,
        "verify.latency.batch": 2, "verify.max_top1_drop": None, "model.weights": str(root / "w.pth"), **overrides})  # fmt: skip
    torch.save(models.architecture(r.model).state_dict(), root / "w.pth")
    (root / "recipe.yaml").write_text(yaml.safe_dump(r.model_dump(mode="json")))
    assert main(["build", str(root / "recipe.yaml"), "--out", str(root / "build"), *args]) == 0
    return root / "build"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, seconds: float, alive=lambda: True) -> bool:
    """Whether `url`/healthz answers 200 within `seconds` (polling; stops early when `alive()` turns false)."""
    deadline = time.monotonic() + seconds
    while alive() and time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    return False


@contextmanager
def serving(artifact, *args, env=None):
    """`deploy serve` in a subprocess; yields (url, process) once /healthz answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "deploy", "serve", str(artifact), "--port", str(port), "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        if not wait_healthy(url, 60, alive=lambda: proc.poll() is None):
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=15)
