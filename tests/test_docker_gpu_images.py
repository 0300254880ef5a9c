"""The GPU images' fixed lines, read from the Dockerfiles (no Docker engine): what the CUDA/TensorRT stack needs."""

import re
from pathlib import Path

from packaging.version import Version

DOCKER = Path(__file__).resolve().parents[1] / "docker"


def _run_lines(text: str) -> list[str]:
    """Each RUN instruction as one line (continuations joined)."""
    joined = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("RUN ")]


def _arg(text: str, name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", text, re.M).group(1)


def test_jetson_keeps_numpy_1_for_the_jetson_ai_lab_wheels_and_gives_the_user_the_gpu():
    text = (DOCKER / "Dockerfile.jetson").read_text()
    runs = _run_lines(text)
    install = next(r for r in runs if 'pip install --no-cache-dir ".[serve,engine]"' in r)
    assert '"numpy<2"' in install and "numpy.__version__.startswith('1.')" in install
    # the onnxruntime-gpu swap uses --no-deps, so it cannot pull numpy 2 back in
    assert "--force-reinstall --no-deps --index-url" in install
    # Jetson's GPU device nodes belong to the video group: without it CUDA sees no device
    assert any(re.search(r"useradd .*--groups video .*deploy", r) for r in runs)


def test_x86_installs_python3_venv_before_making_the_venv():
    runs = _run_lines((DOCKER / "Dockerfile.x86").read_text())
    venv = next(r for r in runs if "python3 -m venv" in r)
    assert "apt-get install --yes --no-install-recommends python3-venv" in venv
    assert venv.index("python3-venv") < venv.index("python3 -m venv")


def test_onnxruntime_gpu_matches_each_images_tensorrt():
    # onnxruntime's TensorRT EP requirements: 1.21 is built with TensorRT 10.8 / CUDA 12.x (the 25.01 image);
    # the Jetson AI Lab jp6/cu126 wheels are built on JetPack 6 itself (TensorRT 10.3)
    x86, jetson = (DOCKER / "Dockerfile.x86").read_text(), (DOCKER / "Dockerfile.jetson").read_text()
    assert Version(_arg(x86, "ONNXRUNTIME_GPU_VERSION")).release[:2] == (1, 21)
    assert _arg(jetson, "ORT_INDEX").endswith("/jp6/cu126")


def test_cuda_python_pins_have_cuda_bindings_and_a_cuda_12_driver():
    """cuda.bindings appeared in cuda-python 12.6.1; 13.x needs a CUDA 13 driver, which JetPack 6 lacks."""
    for name in ("Dockerfile.x86", "Dockerfile.jetson"):
        v = Version(_arg((DOCKER / name).read_text(), "CUDA_PYTHON_VERSION"))
        assert Version("12.6.1") <= v < Version("13"), (name, v)
