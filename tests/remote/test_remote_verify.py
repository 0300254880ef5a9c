"""`deploy verify --on ssh://...`: a real OpenSSH server on 127.0.0.1 (this machine is the "device"), a real build,
and each fault: unreachable, authentication refused, host-key mismatch, no onnxruntime, timeout, dropped connection."""

import ast
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deploy.cli import main
from deploy.remote import ssh
from deploy.remote.verify import RUNNER, TIMING
from helpers import small_build

SSHD = Path("/usr/sbin/sshd")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


class Sshd:
    """sshd in the foreground on a free port, with its own host key, authorized key and TMPDIR for sessions."""

    def __init__(self, root: Path):
        self.root, self.port, self.tmp = root, _free_port(), root / "device-tmp"
        self.tmp.mkdir()
        self.host_pub = _keygen(root / "host_key")
        (root / "authorized_keys").write_text(_keygen(root / "client_key") + "\n")
        _keygen(root / "wrong_key")
        (root / "sshd_config").write_text(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {root / "host_key"}
AuthorizedKeysFile {root / "authorized_keys"}
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PidFile none
Subsystem sftp internal-sftp
SetEnv TMPDIR={self.tmp}
""")
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation folder (root only)
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(root / "sshd_config")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"sshd did not start: {self.proc.stderr.read()}")
                time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"ssh://{os.environ.get('USER', 'root')}@127.0.0.1:{self.port}"

    def config(self, name: str, key: str = "client_key", known: str | None = None) -> Path:
        """An ssh_config (and known_hosts holding `known`, default the server's key) for the client."""
        known_hosts = self.root / f"{name}.known_hosts"
        known_hosts.write_text(
            f"[127.0.0.1]:{self.port} {self.host_pub if known is None else known}\n" if known != "" else ""
        )
        path = self.root / f"{name}.config"
        path.write_text(f"""Host device-alias
  HostName 127.0.0.1
  Port {self.port}
  User {os.environ.get("USER", "root")}
Host *
  IdentityFile {self.root / key}
  IdentitiesOnly yes
  UserKnownHostsFile {known_hosts}
  GlobalKnownHostsFile /dev/null
""")
        return path

    def drop_connections(self) -> None:
        """Kill every per-connection sshd process: the client sees the connection drop."""
        for pid in _descendants(self.proc.pid):
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith("sshd"):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not SSHD.is_file() or not shutil.which("ssh") or not shutil.which("scp"):
        pytest.skip(
            "OpenSSH server and client not installed (/usr/sbin/sshd, ssh, scp): apt-get install openssh-server"
        )
    if os.geteuid() != 0:
        pytest.skip("sshd needs root here (privilege separation in /run/sshd)")
    server = Sshd(tmp_path_factory.mktemp("ssh"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """Held-out images from the built-in calibration photos; latency on one thread."""
    return small_build(tmp_path_factory.mktemp("remote"), **{"verify.latency.runs": 5, "verify.latency.threads": 1})


@pytest.fixture
def build(artifact, tmp_path):
    """A copy of the artifact, so that each test sees the report as the build wrote it."""
    shutil.copytree(artifact, tmp_path / "build")
    return tmp_path / "build"


def _verify(build, sshd, *args, config=None, python=sys.executable):
    config = config or sshd.config("good")
    return main(["verify", str(build), "--python", python, "--ssh-config", str(config), *args])


def _wrapper(tmp_path: Path, body: str) -> str:
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_verify_on_device(build, sshd, capsys):
    before = json.loads((build / "report.json").read_text())
    assert _verify(build, sshd, "--on", sshd.url) == 0
    assert capsys.readouterr().out.startswith(f"{sshd.url}: fp32 p50")
    report = json.loads((build / "report.json").read_text())
    d = report["device"][sshd.url]
    acc, lat, env = d["accuracy"], d["latency"], d["environment"]
    assert acc["dataset"] == f"{before['accuracy']['compared']} held-out calibration images"  # the build's images
    assert acc["fp32"]["agreement"] == 100.0 and (acc["fp32"]["sqnr_db"] is None or acc["fp32"]["sqnr_db"] > 100)
    assert acc["int8"]["agreement"] == before["accuracy"]["agreement"]  # the build's own figures, on the same images
    assert abs(acc["int8"]["sqnr_db"] - before["accuracy"]["sqnr_db"]) < 1.0
    for p in ("fp32", "int8"):
        x = lat[p]
        assert 0 < x["p50_ms"] <= x["p90_ms"] <= x["p99_ms"] and x["throughput_ips"] > 0
        assert (x["batch"], x["runs"], x["threads"]) == (2, 5, 1) and d["startup_s"][p] > 0
    assert lat["int8_speedup_interleaved"] > 0 and d["recommended"]["model"] in ("model.int8.onnx", "model.fp32.onnx")
    assert env["threads"] == 1 and env["cpu_count"] == os.cpu_count() and env["onnxruntime"]
    assert "CPUExecutionProvider" in env["providers"] and env["python"] == sys.version.split()[0]
    assert d["failures"] == [] and report["recommended"] == before["recommended"]  # the build's own is kept
    md = (build / "report.md").read_text()
    assert f"## On device `{sshd.url}`" in md and "**Deploy `model." in md
    assert not list(sshd.tmp.iterdir()) and not list(build.glob(".report.*"))  # nothing left on either side


def test_labeled_set_alias_two_devices_and_first_contact(build, sshd, small_val):
    config = sshd.config("first-contact", known="")
    known = sshd.root / "first-contact.known_hosts"
    assert _verify(build, sshd, "--on", sshd.url, config=config) == 2  # unknown host key: refused by default
    assert _verify(build, sshd, "--on", sshd.url, "--on", "ssh://device-alias", "--val", str(small_val),
                   "--accept-new-host-key", config=config) == 0  # fmt: skip
    assert sshd.host_pub.split()[1] in known.read_text()
    devices = json.loads((build / "report.json").read_text())["device"]
    assert list(devices) == [sshd.url, "ssh://device-alias"]
    for d in devices.values():
        acc = d["accuracy"]
        assert acc["dataset"].startswith("5 labeled validation images")
        assert acc["fp32"]["top1"] == acc["host_fp32_top1"] and acc["fp32"]["top1_drop"] == 0
        assert "top1" in acc["int8"] and "top5" in acc["int8"]
    assert not list(sshd.tmp.iterdir())


def test_missed_threshold_on_device_exits_1_and_is_reported(build, sshd, capsys):
    report = json.loads((build / "report.json").read_text())
    report["recipe"]["verify"]["min_sqnr_db"] = 500.0
    (build / "report.json").write_text(json.dumps(report))
    assert _verify(build, sshd, "--on", sshd.url, "--images", "4") == 1
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"build failed: on {sshd.url}: int8 logit SQNR")
    d = json.loads((build / "report.json").read_text())["device"][sshd.url]
    assert d["recommended"]["precision"] == "fp32" and d["accuracy"]["dataset"] == "4 held-out calibration images"
    assert "Threshold missed" in (build / "report.md").read_text()


@pytest.mark.parametrize("case", ["unreachable", "auth", "host-key", "no-onnxruntime", "timeout", "dropped"])
def test_faults_are_one_line_and_leave_nothing(case, build, sshd, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in build.iterdir() if p.is_file()}
    url, args, config, python = sshd.url, [], None, sys.executable
    if case == "unreachable":
        url = f"ssh://root@127.0.0.1:{_free_port()}"
    elif case == "auth":
        config = sshd.config("wrong-key", key="wrong_key")
    elif case == "host-key":
        config = sshd.config("other-host-key", known=(sshd.root / "wrong_key.pub").read_text().strip())
    elif case == "no-onnxruntime":
        python = _wrapper(tmp_path, f'exec {sys.executable} -S "$@"')  # no site-packages: no onnxruntime
    else:  # a device that takes long: the runner starts 8 s late
        python = _wrapper(tmp_path, f'case "$1" in */device_runner.py) sleep 8;; esac\nexec {sys.executable} "$@"')
        args = ["--timeout", "4"] if case == "timeout" else []
    if case == "dropped":
        timer = threading.Timer(4, sshd.drop_connections)
        timer.start()
    start = time.monotonic()
    assert _verify(build, sshd, "--on", url, *args, config=config, python=python) == 2
    if case == "dropped":
        timer.join()
    assert time.monotonic() - start < 20
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    expected = {"unreachable": "cannot reach 127.0.0.1", "auth": "authentication refused by 127.0.0.1",
                "host-key": "host key mismatch", "no-onnxruntime": "cannot import onnxruntime",
                "timeout": "timed out after 4 s", "dropped": "connection to 127.0.0.1 dropped"}[case]  # fmt: skip
    assert len(err) == 1 and expected in err[0] and url in err[0], err
    assert {p.name: p.read_bytes() for p in build.iterdir() if p.is_file()} == before  # the build untouched
    assert not list(sshd.tmp.iterdir())  # nothing left on the device


@pytest.mark.parametrize("url", ["http://host", "ssh://-oProxyCommand=x", "ssh://host/path", "ssh://us;er@host"])
def test_bad_device_url(url, tmp_path, capsys):
    assert main(["verify", str(tmp_path), "--on", url]) == 2
    assert capsys.readouterr().err.startswith(f"error: --on {url}")


def test_not_a_build_folder(tmp_path, capsys):
    assert main(["verify", str(tmp_path), "--on", "ssh://device"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path} is not a build folder")


def test_parse_device_url():
    assert ssh.parse("ssh://pi@jetson:2222") == ssh.Device("ssh://pi@jetson:2222", "pi", "jetson", 2222)
    assert ssh.parse("ssh://jetson").destination == "jetson"


def test_runner_refuses_another_protocol(tmp_path):
    argv = [sys.executable, str(RUNNER), str(tmp_path), "--protocol", "99", "--warmup", "1", "--runs", "1",
            "--batch", "1", "--eval-batch", "1", "--deadline", "5"]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    assert done.returncode == 3 and "protocol 99" in json.loads(done.stdout)["error"]


def _imports_in(path: Path, function: str) -> set[str]:
    tree = next(n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef) and n.name == function)
    return _imports(tree)


def _imports(path) -> set[str]:
    tree = ast.parse(path.read_text()) if isinstance(path, Path) else path
    modules = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return modules | {"." * n.level + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}


def test_what_runs_on_the_device_needs_only_numpy_and_onnxruntime():
    stdlib = {"__future__", "argparse", "base64", "io", "json", "os", "platform", "signal", "sys", "time", "abc",
              "dataclasses"}  # fmt: skip
    assert _imports(TIMING) <= stdlib | {"numpy"}
    assert _imports(RUNNER) - _imports_in(RUNNER, "_engine") <= stdlib | {"numpy", "onnxruntime", "tensorrt", "base"}
    assert {m for m in _imports_in(RUNNER, "_engine") if "deploy" in m} == {  # --engine only: the device's install
        "deploy", "deploy.recipe", "deploy.runtimes.tensorrt", "deploy.runtimes.tensorrt.builder",
        "deploy.runtimes.tensorrt.sidecar"}  # fmt: skip


def test_engine_needs_tensorrt_on_the_device(build, sshd, capsys):
    before = {p.name: p.read_bytes() for p in build.iterdir() if p.is_file()}
    assert _verify(build, sshd, "--on", sshd.url, "--engine") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {sshd.url}: ") and "cannot import tensorrt (--engine builds the engine there)" in err
    assert {p.name: p.read_bytes() for p in build.iterdir() if p.is_file()} == before
    assert not list(sshd.tmp.iterdir())


def test_the_recipes_devices_are_used_without_on(build, sshd, capsys):
    report = json.loads((build / "report.json").read_text())
    report["recipe"]["verify"]["devices"] = [{"url": "ssh://device-alias", "python": sys.executable,
                                              "ssh_config": str(sshd.config("recipe")), "timeout": 120}]  # fmt: skip
    (build / "report.json").write_text(json.dumps(report))
    assert main(["verify", str(build)]) == 0
    assert list(json.loads((build / "report.json").read_text())["device"]) == ["ssh://device-alias"]
    report["recipe"]["verify"]["devices"] = []
    (build / "report.json").write_text(json.dumps(report))
    assert main(["verify", str(build)]) == 2
    assert "no device to verify on" in capsys.readouterr().err


def test_latency_search_times_its_candidates_on_the_device(sshd, monkeypatch):
    """NetAdapt with prune.latency_on: the budget is reached as the device measures it, each timing is one
    round trip however many candidates it holds, and nothing is left on the device."""
    import numpy as np
    import torch

    from deploy import models, recipe
    from deploy.recipe import DeviceConfig, PruneConfig
    from deploy.remote import latency
    from deploy.stages.prune import prune

    calls = []
    real = latency.runner
    monkeypatch.setattr(latency, "runner", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    torch.manual_seed(0)
    model = models.architecture(recipe.load("mobilenet_v3_small").model).eval()
    images = np.random.default_rng(1).standard_normal((64, 3, 64, 64)).astype(np.float32)
    device = DeviceConfig(url=sshd.url, python=sys.executable, ssh_config=str(sshd.config("latency")), timeout=120)
    # steps of half a group's channels: savings well above the timing noise of a loaded machine (with the default
    # quarter, a busy CI machine once found no candidate that saved measurably more than the noise)
    cfg = PruneConfig(enabled=True, mode="latency", latency_budget=0.9, latency_step=0.5, protect=["features.[1-9].*"],
                      latency_on=device)  # fmt: skip
    pruned, rec = prune(model, cfg, 64, images)
    assert rec["latency_measured"].startswith("onnxruntime-cpu on 127.0.0.1: batch 1, 1 thread")
    assert rec["device"]["cpu_count"] == os.cpu_count() and rec["latency_after_ms"] <= 0.9 * rec["latency_before_ms"]
    assert rec["steps"] and rec["steps"][0]["timed"] > 1  # a step's candidates ...
    timed = [c for c in calls if c[0] == "--time"]
    assert len(timed) == len(calls) and any(c[1].count(",") >= rec["steps"][0]["timed"] for c in timed)  # ... in one run
    assert len(calls) <= 3 + 2 * len(rec["steps"])
    assert not list(sshd.tmp.iterdir())


def test_latency_search_on_an_unreachable_device_is_one_line():
    import numpy as np

    from deploy import models, recipe
    from deploy.errors import DeployError
    from deploy.recipe import DeviceConfig, PruneConfig
    from deploy.stages.prune import prune

    model = models.architecture(recipe.load("mobilenet_v3_small").model).eval()
    device = DeviceConfig(url=f"ssh://root@127.0.0.1:{_free_port()}", timeout=20)
    cfg = PruneConfig(enabled=True, mode="latency", latency_budget=0.9, latency_on=device)
    with pytest.raises(DeployError, match=r"^ssh://root@127.0.0.1:\d+: cannot reach 127.0.0.1") as err:
        prune(model, cfg, 64, np.zeros((8, 3, 64, 64), np.float32))
    assert "\n" not in str(err.value)
