"""`deploy run` and `deploy serve`: the real server on 127.0.0.1, real HTTP requests, good, bad and concurrent."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.cli import main
from helpers import serving, small_build

MAX_BATCH, MAX_BYTES = 4, 1_000_000


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return small_build(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(artifact):
    args = ["--max-batch", str(MAX_BATCH), "--max-wait-ms", "50", "--max-bytes", str(MAX_BYTES), "-k", "2"]
    with serving(artifact, *args) as (url, _):
        yield url


def _post(url, data: bytes, name="photo.png", **kw):
    return httpx.post(f"{url}/predict", files={"image": (name, data, "application/octet-stream")}, timeout=30, **kw)


def _predict_count(url) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "deploy_requests_total" and s.labels == {"endpoint": "/predict", "status": "200"}:
                return s.value
    return 0.0


def _recommended(artifact) -> str:
    """The model the build recommends (int8, unless it timed slower than fp32 for this small random-weight net)."""
    return json.loads((artifact / "serving.json").read_text())["model"]


def test_healthz(server, artifact):
    r = httpx.get(f"{server}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "model": _recommended(artifact), "runtime": "onnxruntime-cpu"}


def test_predict_matches_the_predictor_in_process(server, artifact, skimage_photos):
    from deploy.serving.predictor import Predictor

    payload = (skimage_photos / "chelsea.png").read_bytes()
    r = _post(server, payload, params={"k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == _recommended(artifact) and 1 <= body["batch_size"] <= MAX_BATCH
    top = body["top_k"]
    assert [t["name"] for t in top] == [str(t["index"]) for t in top] and len(top) == 3
    p = Predictor(artifact, threads=1)
    expected = p.top_k(p.decode(payload)[None], 3)[0]
    assert [t["index"] for t in top] == [e.index for e in expected]
    assert np.allclose([t["probability"] for t in top], [e.probability for e in expected], atol=1e-5)
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-5)  # 3 classes: all of them
    assert _post(server, payload).json()["top_k"].__len__() == 2  # the server's default -k


@pytest.mark.parametrize(
    "request_kwargs, status, message",
    [
        ({"files": {"image": ("x.png", b"definitely not an image", "image/png")}}, 400, "not a readable image"),
        ({"files": {"image": ("x.png", b"", "image/png")}}, 400, "the uploaded image is empty"),
        ({"files": {"photo": ("x.png", b"abc", "image/png")}}, 400, "no file field named 'image'"),
        ({"json": {"image": "abc"}}, 415, "multipart/form-data"),
        ({"files": {"image": ("big.png", b"\0" * (MAX_BYTES + 1), "image/png")}}, 413, "exceeds the 1000000-byte limit"),
        ({"content": b"x" * 100, "headers": {"content-type": "multipart/form-data; boundary=zz"}}, 400, ""),
    ],
    ids=["not-an-image", "empty", "wrong-field", "not-multipart", "too-large", "malformed-multipart"],
)
def test_bad_requests_get_clear_4xx(server, request_kwargs, status, message):
    r = httpx.post(f"{server}/predict", timeout=30, **request_kwargs)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_truncated_image_and_bad_k(server, skimage_photos):
    payload = (skimage_photos / "rocket.jpg").read_bytes()
    r = _post(server, payload[: len(payload) // 3], name="rocket.jpg")
    assert r.status_code == 400 and "rocket.jpg: not a readable image" in r.json()["error"]
    assert _post(server, payload, params={"k": 0}).status_code == 422


def test_burst_of_concurrent_requests_is_batched_and_counted(server, artifact, skimage_photos):
    from deploy.serving.predictor import Predictor

    names = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")
    photos = [(skimage_photos / f).read_bytes() for f in names]
    n = 24
    before = _predict_count(server)
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=n) as pool:  # k differs within a batch: 1, 2, 3, 1, ...
        responses = list(pool.map(lambda i: _post(server, photos[i % 4], params={"k": 1 + i % 3}), range(n)))
    elapsed = time.monotonic() - start
    assert [r.status_code for r in responses] == [200] * n
    # each answer is its own photo's, with its own k: what the predictor gives for that photo alone
    p = Predictor(artifact, threads=1)
    for i, r in enumerate(responses):
        want = p.top_k(p.decode(photos[i % 4], names[i % 4])[None], 1 + i % 3)[0]
        got = r.json()["top_k"]
        assert [g["index"] for g in got] == [w.index for w in want], f"request {i}"
        assert [g["probability"] for g in got] == pytest.approx([w.probability for w in want], abs=1e-5)
    sizes = [r.json()["batch_size"] for r in responses]
    assert max(sizes) > 1 and max(sizes) <= MAX_BATCH  # concurrent requests shared model runs, never above max
    assert elapsed < 30, f"{n} requests took {elapsed:.1f}s"
    assert _predict_count(server) - before == n

    metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server}/metrics").text)}
    lat = {s.name: s.value for s in metrics["deploy_request_latency_seconds"].samples if not s.labels.get("le")}
    assert lat["deploy_request_latency_seconds_count"] >= n
    assert 0 < lat["deploy_request_latency_seconds_sum"]
    batch = [s for s in metrics["deploy_batch_size"].samples if s.name == "deploy_batch_size_bucket"]
    assert any(s.labels["le"] == "1.0" and s.value < [x for x in batch if x.labels["le"] == "+Inf"][0].value for s in batch)


def test_a_streamed_body_over_the_limit_is_refused(server):
    """No Content-Length (chunked transfer): the limit holds on the bytes as they arrive."""

    def body():
        for _ in range(MAX_BYTES // 65536 + 2):
            yield b"x" * 65536

    r = httpx.post(f"{server}/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"},
                   timeout=30)  # fmt: skip
    assert r.status_code == 413 and "exceeds the" in r.json()["error"]


def test_run_prints_top_k_and_rejects_bad_input(artifact, skimage_photos, tmp_path, capsys):
    images = [str(skimage_photos / "astronaut.png"), str(skimage_photos / "coffee.png")]
    assert main(["run", str(artifact), *images, "-k", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].endswith(f"{_recommended(artifact)} on onnxruntime-cpu")
    assert [line.split(": ")[0] for line in out[1:]] == images and all(line.count("(") == 2 for line in out[1:])
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"nope")
    assert main(["run", str(artifact), str(junk)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {junk}: not a readable image (unknown format)"
    assert main(["run", str(tmp_path / "nothing"), images[0]]) == 2
    assert "artifact not found" in capsys.readouterr().err
    (tmp_path / "model.fp32.onnx").write_bytes((artifact / "model.fp32.onnx").read_bytes())
    assert main(["run", str(tmp_path / "model.fp32.onnx"), images[0]]) == 2
    assert "report.json is missing" in capsys.readouterr().err
