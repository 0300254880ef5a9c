"""benchmarks/int8_threads.py: its OpenVINO adapter gives ORT's fp32 logits (skipped without openvino)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import bad_layer_onnx, images

from deploy.runtimes.ort import OrtCpu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_openvino_adapter_matches_ort_fp32(tmp_path: Path):
    pytest.importorskip("openvino")
    from int8_threads import OpenVinoCpu

    path = bad_layer_onnx(tmp_path / "m.onnx")
    ov = OpenVinoCpu(path, threads=1)
    assert (ov.name, ov.threads) == ("openvino-cpu", 1)
    # OpenVINO's default precision is bf16 on AMX CPUs (8-bit mantissa): a looser bound there
    precision = ov.compiled(1).get_compiled_model().get_property("INFERENCE_PRECISION_HINT").get_type_name()
    tol = 1e-3 if precision == "f32" else 3e-2
    for n in (1, 3):  # compiled for each batch size
        x = images(n, seed=n)
        ref = OrtCpu(path, threads=1).infer(x)
        got = ov.infer(x)
        assert got.shape == ref.shape
        assert np.abs(got - ref).max() <= tol * np.abs(ref).max()
