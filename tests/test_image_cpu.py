"""docker/Dockerfile.cpu built and run for real (podman or docker): a fixture build served from a read-only mount,
/healthz, /predict (the same top-1 as `deploy run` outside), /metrics, non-root, HEALTHCHECK, no torch, < 500 MB;
its OpenVINO variant (EXTRAS=serve,openvino) serving a `--target openvino` build on OpenVINO.

Minutes (an image build): runs only with DEPLOY_CONTAINER=1 (and podman or docker); CI sets it up with
../shared/tools/container-setup, which provides python:3.11-slim-bookworm locally."""

import json
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.cli import main
from helpers import free_port, small_build, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
TAG = "localhost/edge-deploy:cpu-test"
MAX_IMAGE_BYTES = 500 * 1000 * 1000
pytestmark = pytest.mark.container


@pytest.fixture(scope="module")
def engine() -> str:
    if os.environ.get("DEPLOY_CONTAINER") != "1":
        pytest.skip("image build and run take minutes: set DEPLOY_CONTAINER=1 to run")
    found = shutil.which("podman") or shutil.which("docker")
    if found is None:
        pytest.skip("neither podman nor docker is installed")
    return found


def _run(*args, check=True, timeout=900) -> subprocess.CompletedProcess:
    done = subprocess.run(list(args), check=False, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode:
        pytest.fail(f"{' '.join(args)} failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
    return done


@contextmanager
def _build_image(engine: str, tag: str, *args: str):
    start = time.monotonic()
    oci_drops_healthcheck = ["--format", "docker"] if Path(engine).name == "podman" else []
    _run(engine, "build", *oci_drops_healthcheck, *args, "-f", str(ROOT / "docker" / "Dockerfile.cpu"), "-t", tag,
         str(ROOT))  # fmt: skip
    print(f"image {tag} built in {time.monotonic() - start:.0f} s")
    try:
        yield tag
    finally:
        _run(engine, "rmi", "-f", tag, check=False)


@pytest.fixture(scope="module")
def image(engine) -> str:
    with _build_image(engine, TAG) as tag:
        yield tag


def _readable(build: Path) -> Path:
    """`build`, readable by any user (the server runs as uid 10001)."""
    for p in [build.parent, *build.parent.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return build


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    """A real int8 build."""
    return _readable(small_build(tmp_path_factory.mktemp("image")))


@contextmanager
def _serve(engine: str, image: str, artifact: Path):
    port = free_port()
    name = f"edge-deploy-test-{os.getpid()}-{port}"
    start = time.monotonic()
    _run(engine, "run", "-d", "--name", name, "-p", f"127.0.0.1:{port}:8000",
         "-v", f"{artifact}:/models/artifact:ro", image)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    if not wait_healthy(url, 90):
        logs = _run(engine, "logs", name, check=False)
        _run(engine, "rm", "-f", name, check=False)
        pytest.fail(f"the container did not answer /healthz: {logs.stdout + logs.stderr}")
    print(f"container answered /healthz {time.monotonic() - start:.1f} s after `run`")
    try:
        yield name, url
    finally:
        _run(engine, "rm", "-f", name, check=False)


@pytest.fixture(scope="module")
def server(engine, image, artifact):
    with _serve(engine, image, artifact) as running:
        yield running


def _predicts_like_deploy_run_outside(url: str, artifact: Path, photo: Path, capsys) -> None:
    r = httpx.post(f"{url}/predict", files={"image": (photo.name, photo.read_bytes(), "image/png")}, timeout=30)
    assert r.status_code == 200, r.text
    top1 = r.json()["top_k"][0]
    capsys.readouterr()
    assert main(["run", str(artifact), str(photo), "-k", "1"]) == 0
    outside = capsys.readouterr().out.splitlines()[1]
    assert outside.startswith(f"{photo}: {top1['name']} ({top1['probability']:.3f})")


def test_image_serves_the_build_like_deploy_run_outside(server, artifact, skimage_photos, capsys):
    _, url = server
    health = httpx.get(f"{url}/healthz").json()
    served = json.loads((artifact / "serving.json").read_text())["model"]  # int8 unless it timed slower than fp32
    assert health == {"status": "ok", "model": served, "runtime": "onnxruntime-cpu"}
    _predicts_like_deploy_run_outside(url, artifact, skimage_photos / "chelsea.png", capsys)
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("deploy_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 1


def test_image_is_slim_non_root_and_healthy(engine, server, image):
    name, _ = server
    assert _run(engine, "exec", name, "id", "-u").stdout.strip() == "10001"
    no_torch = _run(engine, "exec", name, "python", "-c", "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    write = _run(engine, "exec", name, "touch", "/models/artifact/x", check=False)
    assert write.returncode != 0  # mounted read-only
    if Path(engine).name == "podman":
        assert _run(engine, "healthcheck", "run", name).returncode == 0
        status = json.loads(_run(engine, "inspect", name).stdout)[0]["State"]["Health"]["Status"]
    else:  # docker runs the HEALTHCHECK on its own schedule: wait for the first result
        deadline = time.monotonic() + 90
        while (status := _run(engine, "inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()) == "starting":
            assert time.monotonic() < deadline, "no HEALTHCHECK result within 90 s"
            time.sleep(2)
    assert status == "healthy"
    size = int(_run(engine, "image", "inspect", "-f", "{{.Size}}", image).stdout.strip())
    print(f"image size {size / 1e6:.0f} MB")
    assert size < MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"


def test_the_openvino_variant_serves_a_build_made_for_openvino_there(engine, tmp_path_factory, skimage_photos, capsys):
    """--build-arg EXTRAS=serve,openvino: the int8 model of a `--target openvino` build served on OpenVINO's CPU
    plugin, as serving.json names it when the build measured it fastest there."""
    pytest.importorskip("openvino")  # the build verifies the model on OpenVINO
    artifact = small_build(tmp_path_factory.mktemp("openvino"), **{"quantize.target": "openvino"})
    spec = json.loads((artifact / "serving.json").read_text())
    # a 64 px model: the build may measure fp32 on ORT fastest; serve its int8 on OpenVINO as when it does not
    (artifact / "serving.json").write_text(json.dumps({**spec, "model": "model.int8.onnx", "runtime": "openvino-cpu"}))
    with _build_image(engine, f"{TAG}-openvino", "--build-arg", "EXTRAS=serve,openvino") as image:
        with _serve(engine, image, _readable(artifact)) as (_, url):
            health = httpx.get(f"{url}/healthz").json()
            assert health["model"] == "model.int8.onnx" and health["runtime"].startswith("openvino-cpu")
            _predicts_like_deploy_run_outside(url, artifact, skimage_photos / "chelsea.png", capsys)
        size = int(_run(engine, "image", "inspect", "-f", "{{.Size}}", image).stdout.strip())
        print(f"openvino image size {size / 1e6:.0f} MB")
