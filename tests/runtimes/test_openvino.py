"""OpenVINO's CPU plugin (deploy/runtimes/openvino.py) gives ORT's logits, fp32 and int8 (skipped without openvino)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import bad_layer_onnx, images

from deploy.runtimes.ort import OrtCpu


def test_openvino_matches_ort_fp32_at_each_batch_size_and_returns_its_own_arrays(tmp_path: Path):
    pytest.importorskip("openvino")
    from deploy.runtimes.openvino import OpenVinoCpu

    path = bad_layer_onnx(tmp_path / "m.onnx")
    ov = OpenVinoCpu(path, threads=1)
    assert ov.name.startswith("openvino-cpu") and ov.threads == 1
    # OpenVINO runs float layers in bf16 (8-bit mantissa) on CPUs that have it: a looser bound there
    tol = 1e-3 if ov.precision == "f32" else 3e-2
    for n in (1, 3):  # compiled for each batch size
        x = images(n, seed=n)
        ref = OrtCpu(path, threads=1).infer(x)
        got = ov.infer(x)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
    first = ov.infer(images(1, seed=7))
    kept = first.copy()
    second = ov.infer(images(1, seed=8))
    assert np.array_equal(first, kept) and not np.array_equal(first, second)  # not the request's reused buffer


def test_openvino_missing_is_one_line(monkeypatch, tmp_path: Path):
    from deploy.errors import DeployError
    from deploy.runtimes import openvino

    monkeypatch.setattr(openvino, "available", lambda: False)
    with pytest.raises(DeployError, match=r"needs OpenVINO: pip install 'edge-deploy\[openvino\]'"):
        openvino.OpenVinoCpu(tmp_path / "m.onnx")
