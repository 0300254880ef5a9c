"""`deploy serve` under abuse: image bombs, slow clients, random paths, no API key, failing inference, bad
settings and broken reports. The real server on 127.0.0.1 with short timeouts, bounded counts and times."""

import json
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from helpers import bomb_png, serving, small_build

from deploy.cli import main

KEY = "test-key-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {KEY}"}
HEADER_TIMEOUT, REQUEST_TIMEOUT, MAX_CONNECTIONS = 2, 2, 150


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """fp32 only (no calibration, to keep it quick)."""
    return small_build(tmp_path_factory.mktemp("hardening"), int8=False)


@pytest.fixture(scope="module")
def server(artifact):
    args = ["--header-timeout", str(HEADER_TIMEOUT), "--request-timeout", str(REQUEST_TIMEOUT),
            "--keep-alive-timeout", "1", "--max-connections", str(MAX_CONNECTIONS)]  # fmt: skip
    with serving(artifact, *args, env={"DEPLOY_API_KEY": KEY}) as running:
        yield running


def _post(url, data: bytes, name="photo.png", headers=AUTH, **kw):
    return httpx.post(f"{url}/predict", files={"image": (name, data, "image/png")}, headers=headers, timeout=30, **kw)


def _memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in kB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_bombs_get_400_and_the_server_memory_stays_bounded(server, skimage_photos):
    url, proc = server
    before = _memory_kb(proc.pid)
    bombs = [bomb_png(1_000_000, 1)] + [bomb_png(12000, 12000)] * 8  # 0.2 and 18 KB; old code: 12-16 GB, +4 GB
    with ThreadPoolExecutor(len(bombs)) as pool:
        replies = list(pool.map(lambda b: _post(url, b, "bomb.png"), bombs))
    assert [r.status_code for r in replies] == [400] * len(bombs)
    assert "bomb.png: 1000000x1 image exceeds the 20:1 aspect-ratio limit" in replies[0].json()["error"]
    assert all("12000x12000 image exceeds the 50,000,000-pixel limit" in r.json()["error"] for r in replies[1:])
    after = _memory_kb(proc.pid)
    assert after["VmHWM"] - before["VmHWM"] < 300_000 and after["VmRSS"] - before["VmRSS"] < 300_000, (before, after)
    assert _post(url, (skimage_photos / "chelsea.png").read_bytes()).status_code == 200  # still serving


def test_slow_clients_neither_block_healthz_nor_stay_connected(server):
    url, _ = server
    stalled = []
    try:
        for _ in range(200):  # more than --max-connections: the longest-waiting ones are closed to make room
            s = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; bou")
            s.setblocking(False)
            stalled.append(s)
        start = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        assert time.monotonic() - start < 2
        early = sum(map(_closed_by_peer, stalled))
        assert 200 - MAX_CONNECTIONS <= early < 200  # the cap, not yet the header timeout
        deadline = time.monotonic() + HEADER_TIMEOUT + 5
        while sum(map(_closed_by_peer, stalled)) < 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sum(map(_closed_by_peer, stalled)) == 200  # the header timeout closed the rest
    finally:
        for s in stalled:
            s.close()


def test_a_stalled_body_gets_408_and_the_connection_closes(server):
    url, _ = server
    head = (f"POST /predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 1000\r\n"
            "Content-Type: multipart/form-data; boundary=zz\r\n\r\n--zz\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=REQUEST_TIMEOUT + 5) as s:
        s.sendall(head.encode())
        start, reply = time.monotonic(), b""
        while chunk := s.recv(65536):  # until the server closes the connection
            reply += chunk
    assert REQUEST_TIMEOUT - 0.5 < time.monotonic() - start < REQUEST_TIMEOUT + 4
    status, _, body = reply.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 408") and json.loads(body) == {"error": "request body not received within 2 s"}


def test_metrics_label_routes_not_raw_paths(server):
    url, _ = server
    with httpx.Client(headers=AUTH, timeout=10) as client:
        for i in range(60):
            assert client.get(f"{url}/x{uuid.uuid4().hex}/{i}").status_code == 404
        families = text_string_to_metric_families(client.get(f"{url}/metrics").text)
    samples = [s for f in families for s in f.samples if s.name == "deploy_requests_total"]
    assert {s.labels["endpoint"] for s in samples} <= {"/healthz", "/metrics", "/predict", "other"}
    assert sum(s.value for s in samples if s.labels == {"endpoint": "other", "status": "404"}) >= 60


def test_api_key_guards_everything_but_healthz(server, skimage_photos):
    url, _ = server
    photo = (skimage_photos / "coffee.png").read_bytes()
    assert httpx.get(f"{url}/healthz").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": KEY[:-1]}, {"Authorization": KEY}):
        for r in (_post(url, photo, headers=headers), httpx.get(f"{url}/metrics", headers=headers)):
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
    assert _post(url, photo, headers={"X-API-Key": KEY}).status_code == 200
    assert _post(url, photo, headers={"Authorization": f"bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=AUTH).status_code == 200


@pytest.mark.parametrize("method, path, params, status, message", [
    ("GET", "/nope", {}, 404, "Not Found"),
    ("GET", "/predict", {}, 405, "Method Not Allowed"),
    ("POST", "/predict", {"k": "0"}, 422, "query.k: Input should be greater than or equal to 1"),
    ("POST", "/predict", {"k": "many"}, 422, "query.k: Input should be a valid integer"),
])  # fmt: skip
def test_every_error_body_is_one_error_field(server, method, path, params, status, message):
    url, _ = server
    r = httpx.request(method, f"{url}{path}", params=params, headers=AUTH, files={"image": ("a.png", b"x")}
                      if method == "POST" else None)  # fmt: skip
    assert r.status_code == status and list(r.json()) == ["error"] and r.json()["error"].startswith(message)


def test_a_failing_batch_answers_every_waiting_request_with_500_and_serving_goes_on(artifact, tmp_path,
                                                                                     skimage_photos):  # fmt: skip
    """A real ONNX model that ORT cannot run on a batch of 2 (it reshapes to a fixed [1, 3])."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["pooled"], axes=[2, 3], keepdims=0),
         helper.make_node("Reshape", ["pooled", "shape"], ["logits"])],
        "fails_on_batches", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 64, 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [1, 3])])  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "model.fp32.onnx")
    shutil.copy(artifact / "report.json", tmp_path / "report.json")
    photo = (skimage_photos / "astronaut.png").read_bytes()
    with serving(tmp_path, "--max-batch", "2", "--max-wait-ms", "1000", env={"DEPLOY_API_KEY": ""}) as (url, _):
        with ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda _: _post(url, photo, headers={}), range(2)))
        assert [r.status_code for r in replies] == [500, 500]
        assert all(r.json()["error"].startswith("inference failed (") for r in replies)
        single = _post(url, photo, headers={})  # alone in its batch: the model runs
        assert single.status_code == 200 and single.json()["batch_size"] == 1
        assert httpx.get(f"{url}/healthz").status_code == 200


def test_bad_port_and_port_in_use_are_one_line_errors(artifact, capsys):
    assert main(["serve", str(artifact), "--port", "99999"]) == 2
    assert capsys.readouterr().err.strip() == "error: --port 99999: expected 1 to 65535"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(artifact), "--port", str(port), "--threads", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


@pytest.mark.parametrize("name, content, message", [
    ("serving.json", "{not json", "not readable JSON (Expecting property name"),
    ("serving.json", '{"schema": 1, "model": "model.fp32.onnx"}', "malformed serving description (KeyError"),
    ("report.json", "{not json", "not readable JSON (Expecting property name"),  # a folder from before serving.json
    ("report.json", '{"model": "x"}', 'the build report holds no "recipe"'),
    ("report.json", '{"recipe": {"model": {"name": 3}}}', "malformed preprocessing"),
])  # fmt: skip
def test_a_broken_description_is_a_one_line_error_naming_it(artifact, tmp_path, skimage_photos, capsys, name, content,
                                                            message):  # fmt: skip
    shutil.copy(artifact / "model.fp32.onnx", tmp_path / "model.fp32.onnx")
    (tmp_path / name).write_text(content)
    assert main(["run", str(tmp_path), str(skimage_photos / "coffee.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {tmp_path / name}: ") and message in err
