"""The host side of `deploy verify BUILD --on ssh://...`: the evaluation images and the host's fp32 logits on
them, one run of device_runner.py on each device (ssh.py), and the figures recorded under report["device"][URL].

The evaluation images are the build's: the labeled --val folder given again, else the held-out calibration
images re-drawn from the folder report["calibration"] names (or --calib), as `deploy diagnose` does; at most
--images of them (a seeded subset). They travel preprocessed, as one images.npy; the device sends its logits
back and the figures are computed here against the host's fp32 logits."""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__, metrics
from ..console import info, warn
from ..errors import DeployError, ThresholdMissed
from ..evalset import sample
from . import ssh
from .device_runner import PROTOCOL

RUNNER = Path(__file__).with_name("device_runner.py")
TIMING = Path(__file__).parent.parent / "runtimes" / "base.py"  # imports only numpy: the runner ships it
CLEANUP_TIMEOUT_S = 15


@dataclass
class Options:
    python: str = "python3"  # on the device
    images: int = 100
    val: Path | None = None
    calib: Path | None = None
    timeout: float = 600.0  # seconds for each device's whole remote run
    ssh_config: Path | None = None
    accept_new_host_key: bool = False
    threads: int | None = None  # on the device; default the recipe's, else all its cores
    engine: bool = False  # also build a TensorRT engine on the device and measure it


def verify(folder: Path, urls: list[str], opts: Options) -> dict:
    """Measure the build in `folder` on each device and record the results in its report (only when every device
    was measured); return them by URL. A recipe threshold missed on a device raises ThresholdMissed after the
    report is written."""
    from ..core import output

    devices = [(_parse(u), opts) for u in urls]
    if opts.images <= 0 or opts.timeout <= 0:
        raise DeployError("--images and --timeout must be positive")
    folder = folder.resolve()
    report, recipe = _read_build(folder)
    devices = devices or [(ssh.parse(d.url), _options(opts, d)) for d in recipe.verify.devices]
    if not devices:
        raise DeployError("no device to verify on: pass --on ssh://[user@]host[:port] or set verify.devices in the recipe")
    with output.lock(folder), tempfile.TemporaryDirectory(prefix="edge-deploy-verify-") as tmp:
        inputs, labels, dataset = _evaluation_set(folder, report, recipe, opts)
        np.save(Path(tmp) / "images.npy", inputs)
        from ..runtimes.ort import OrtCpu

        ref = metrics.logits(OrtCpu(folder / "model.fp32.onnx", recipe.verify.latency.threads), inputs,
                             recipe.verify.batch, "Evaluating fp32 on the host")  # fmt: skip
        models = [folder / f"model.{p}.onnx" for p in ("fp32", "int8") if (folder / f"model.{p}.onnx").is_file()]
        files = [RUNNER, TIMING, Path(tmp) / "images.npy", *models]
        if opts.engine:  # the build's engine settings, for the engine built on the device
            files.append(Path(tmp) / "tensorrt.json")
            files[-1].write_text(recipe.tensorrt.model_dump_json())
        entries = {d.url: _entry(d, measure(d, files, recipe, o), ref, labels, recipe, dataset) for d, o in devices}
        report.setdefault("device", {}).update(entries)
        _save(report, folder)
    failures = [f"on {url}: {m}" for url, e in entries.items() for m in e["failures"]]
    if failures:
        raise ThresholdMissed("; ".join(failures))
    return entries


def _parse(url: str) -> ssh.Device:
    try:
        return ssh.parse(url)
    except DeployError as err:
        raise DeployError(f"--on {err}") from None


def _options(opts: Options, device) -> Options:
    """The options for a device of the recipe's verify.devices: its own Python, ssh_config, host-key rule, timeout."""
    return replace(opts, python=device.python, timeout=device.timeout, accept_new_host_key=device.accept_new_host_key,
                   ssh_config=Path(device.ssh_config) if device.ssh_config else opts.ssh_config)  # fmt: skip


def _read_build(folder: Path):
    from ..recipe import validate

    path = folder / "report.json"
    if not path.is_file() or not (folder / "model.fp32.onnx").is_file():
        raise DeployError(f"{folder} is not a build folder (needs report.json and model.fp32.onnx)")
    try:
        report = json.loads(path.read_text())
        return report, validate(report["recipe"], str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DeployError(f"{path}: not a readable build report ({str(err).splitlines()[0][:120]})") from None


def _evaluation_set(folder: Path, report: dict, recipe, opts: Options):
    """Preprocessed images, their labels (with --val) and a description: the build's evaluation images."""
    from .. import data

    pre, seed = data.Preprocessor(recipe.preprocess), recipe.quantize.calibration.seed
    if opts.val:
        inputs, labels = data.labeled_set(opts.val, pre, recipe.model.num_classes, limit=opts.images, seed=seed).load()
        what = f"labeled validation images from {opts.val}"
    elif report.get("validation"):
        raise DeployError(
            f"{folder} was built with --val: pass --val DIR again (the images are not in the build folder)"
        )
    else:
        cal, q = report.get("calibration") or {}, recipe.quantize
        calib = opts.calib or (None if cal.get("builtin", True) else Path(cal["source"]))
        inputs = data.calibration_data(calib, pre, q.calibration.samples, seed, recipe.verify.heldout).heldout.inputs
        inputs, labels = inputs[sample(len(inputs), opts.images, seed)], None
        what = "held-out calibration images"
    return np.ascontiguousarray(inputs, np.float32), labels, f"{len(inputs)} {what}"


@contextmanager
def remote_folder(link: ssh.Ssh, python: str, modules: str = "onnxruntime, numpy") -> Iterator[str]:
    """A new temporary folder on the device, after checking that `python` there imports `modules`; removed
    afterwards whatever happens."""
    py = shlex.quote(python)
    info(f"[{link.device.url}] checking {python}, {modules}")
    done = link.run(f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/edge-deploy.XXXXXXXX") && echo "$d" && '
                    f"TMPDIR=\"$d\" {py} -c {shlex.quote(f'import {modules}')}")  # fmt: skip
    remote = done.stdout.strip()
    if not ssh.REMOTE_DIR.fullmatch(remote):
        raise DeployError(f"{link.device.url}: cannot create a temporary folder ({_last_line(done)})")
    try:
        if done.returncode != 0:
            raise DeployError(_probe_failure(link.device, python, done))
        yield remote
    finally:
        _remove(link, remote)


def runner(link: ssh.Ssh, python: str, remote: str, args: list[str], timeout: float | None = None,
           last: bool = True) -> dict:  # fmt: skip
    """Run device_runner.py in `remote` (TMPDIR pointing there, so what onnxruntime writes goes with it) with
    `args`; its JSON, or a one-line error. `last`: the folder's last use, removed on the device as the run
    ends, even when the connection drops."""
    left = link.left() if timeout is None else timeout
    argv = [python, f"{remote}/{RUNNER.name}", remote, "--protocol", str(PROTOCOL), *args,
            "--deadline", str(max(1, math.ceil(left)))]  # fmt: skip
    cleanup = f"trap {shlex.quote(f'rm -rf -- {shlex.quote(remote)}')} EXIT; " if last else ""
    script = f"{cleanup}trap 'exit 129' HUP INT TERM; TMPDIR={shlex.quote(remote)} {shlex.join(argv)}"
    return _result(link, link.run(script, timeout=timeout))


def measure(device: ssh.Device, files: list[Path], recipe, opts: Options) -> dict:
    """Copy `files` to a new temporary folder on the device, run device_runner.py there and return its JSON; with
    --engine it builds a TensorRT engine there first (edge-deploy[engine] and TensorRT on the device)."""
    link = ssh.Ssh(device, opts.timeout, opts.ssh_config, opts.accept_new_host_key)
    modules = "onnxruntime, numpy" + (", tensorrt, deploy" if opts.engine else "")
    with remote_folder(link, opts.python, modules) as remote:
        info(f"[{device.url}] copying {len(files)} files to {remote}")
        link.copy(files, remote)
        lat = recipe.verify.latency
        args = ["--warmup", str(lat.warmup), "--runs", str(lat.runs), "--batch", str(lat.batch),
                "--eval-batch", str(recipe.verify.batch)]  # fmt: skip
        threads = opts.threads or lat.threads
        args += ["--threads", str(threads)] if threads else []
        args += ["--engine", __version__] if opts.engine else []
        info(f"[{device.url}] measuring" + (" (building a TensorRT engine there first)" if opts.engine else ""))
        return runner(link, opts.python, remote, args)


def _last_line(done) -> str:
    err = done.stderr.strip().splitlines()
    return err[-1] if err else f"exit status {done.returncode}"


def _probe_failure(device: ssh.Device, python: str, done) -> str:
    last = _last_line(done)
    for module, install in (("onnxruntime", "pip install onnxruntime"), ("numpy", "pip install numpy"),
                            ("tensorrt", "JetPack or NVIDIA's TensorRT packages"),
                            ("deploy", "pip install 'edge-deploy[engine]'")):  # fmt: skip
        if f"No module named '{module}'" in done.stderr:
            need = " (--engine builds the engine there)" if module in ("tensorrt", "deploy") else ""
            return (f"{device.url}: {python} on the device cannot import {module}{need}: install it there "
                    f"({install}) or pass --python with an interpreter that has it")  # fmt: skip
    if done.returncode == 127:
        return f"{device.url}: no {python} on the device ({last}); pass --python PATH"
    return f"{device.url}: cannot prepare the device ({last})"


def _result(link: ssh.Ssh, done) -> dict:
    url = link.device.url
    if done.returncode == 128 + 14:  # the runner's alarm: the deadline passed on the device first
        raise DeployError(f"{url}: timed out after {link.timeout:g} s (--timeout)")
    try:
        result = json.loads(done.stdout)
    except ValueError:
        raise DeployError(f"{url}: the device runner failed ({_last_line(done)})") from None
    theirs = result.get("protocol") if isinstance(result, dict) else None
    if theirs != PROTOCOL:
        raise DeployError(f"{url}: the device runner speaks protocol {theirs}, this host {PROTOCOL}")
    if "error" in result:
        raise DeployError(f"{url}: {result['error']}")
    return result


def _remove(link: ssh.Ssh, remote: str) -> None:
    try:
        done = link.run(f"rm -rf -- {shlex.quote(remote)}", timeout=CLEANUP_TIMEOUT_S)
        failed = done.returncode != 0 and (done.stderr.strip() or f"exit status {done.returncode}")
    except DeployError as err:
        failed = str(err)
    if failed:
        warn(f"could not remove {remote} on {link.device.url}: {failed}")


def _entry(device: ssh.Device, result: dict, ref: np.ndarray, labels, recipe, dataset: str) -> dict:
    """report["device"][URL]: accuracy against the host's fp32 logits, latency, start-up, the recommendation."""
    from ..stages.verify import recommend

    models = result["models"]
    raw = {p: metrics.compare(ref, _array(m["logits"]), labels) for p, m in models.items()}
    missed = metrics.missed_thresholds(recipe.verify, raw["int8"]) if "int8" in raw else []
    if "engine" in raw:
        missed += [f"TensorRT engine: {m}" for m in metrics.missed_thresholds(recipe.verify, raw["engine"])]
    accuracy: dict = {"dataset": dataset, "against": "the host's fp32 logits"}
    if labels is not None:
        accuracy["host_fp32_top1"] = metrics.accuracy(ref, labels)["top1"]
    for p, c in raw.items():
        accuracy[p] = {"agreement": c["agreement"], "sqnr_db": None if math.isinf(c["sqnr_db"]) else c["sqnr_db"]}
        if labels is not None:
            accuracy[p].update(top1=c["int8"]["top1"], top5=c["int8"]["top5"], top1_drop=c["top1_drop"])
    lat = {"runtime": f"onnxruntime-cpu on {device.host}", **{p: m["latency"] for p, m in models.items()}}
    if "engine" in models:
        lat["engine_runtime"] = f"TensorRT {result['environment']['tensorrt']} on {device.host}"
    if "int8" in models:
        fp32_ms, int8_ms = result["interleaved_best_ms"]
        lat.update(int8_speedup=lat["fp32"]["p50_ms"] / lat["int8"]["p50_ms"],
                   int8_throughput_speedup=lat["int8"]["throughput_ips"] / lat["fp32"]["throughput_ips"],
                   int8_speedup_interleaved=fp32_ms / int8_ms)  # fmt: skip
        recommended = recommend(recipe.quantize.target, missed, lat)
    else:
        recommended = {"model": "model.fp32.onnx", "precision": "fp32", "reason": "the build has no int8 model"}
    if "engine" in models and not missed:
        e = models["engine"]
        recommended = {"model": f"model.{e['precision']}.engine", "precision": e["precision"],
                       "reason": f"a TensorRT engine built on the device from {e['onnx']} (engines are not portable: "
                                 f"build it there with `deploy engine`): batch-1 p50 {e['latency']['p50_ms']:.2f} ms, "
                                 "within the accuracy thresholds"}  # fmt: skip
    return {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": result["environment"],
        "accuracy": accuracy,
        "latency": lat,
        "startup_s": {p: m["startup_s"] for p, m in models.items()},
        **({"engine": {k: models["engine"][k] for k in ("precision", "onnx", "build_s")}} if "engine" in models else {}),
        "recommended": recommended,
        "failures": missed,
    }


def _array(text: str) -> np.ndarray:
    import base64
    import io

    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False)


def _save(report: dict, folder: Path) -> None:
    """report.json and report.md re-rendered from it, each written to a temporary file and renamed into place."""
    from ..core.report import markdown

    plot = "latency.png" if (folder / "latency.png").is_file() else None
    texts = {"report.json": json.dumps(report, indent=2, default=str) + "\n", "report.md": markdown(report, plot)}
    tmps = {name: folder / f".{name}.tmp-{os.getpid()}" for name in texts}
    try:
        for name, text in texts.items():
            tmps[name].write_text(text)
        for name, tmp in tmps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in tmps.values():
            tmp.unlink(missing_ok=True)
