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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import metrics
from ..console import info, warn
from ..errors import DeployError, ThresholdMissed
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


def verify(folder: Path, urls: list[str], opts: Options) -> dict:
    """Measure the build in `folder` on each device and record the results in its report (only when every device
    was measured); return them by URL. A recipe threshold missed on a device raises ThresholdMissed after the
    report is written."""
    from ..core import output

    devices = [ssh.parse(u) for u in urls]
    if opts.images <= 0 or opts.timeout <= 0:
        raise DeployError("--images and --timeout must be positive")
    folder = folder.resolve()
    report, recipe = _read_build(folder)
    with output.lock(folder), tempfile.TemporaryDirectory(prefix="edge-deploy-verify-") as tmp:
        inputs, labels, dataset = _evaluation_set(folder, report, recipe, opts)
        np.save(Path(tmp) / "images.npy", inputs)
        from ..runtimes.ort import OrtCpu

        ref = metrics.logits(OrtCpu(folder / "model.fp32.onnx", recipe.verify.latency.threads), inputs,
                             recipe.verify.batch, "Evaluating fp32 on the host")  # fmt: skip
        models = [folder / f"model.{p}.onnx" for p in ("fp32", "int8") if (folder / f"model.{p}.onnx").is_file()]
        files = [RUNNER, TIMING, Path(tmp) / "images.npy", *models]
        entries = {d.url: _entry(d, measure(d, files, recipe, opts), ref, labels, recipe, dataset) for d in devices}
        report.setdefault("device", {}).update(entries)
        _save(report, folder)
    failures = [f"on {url}: {m}" for url, e in entries.items() for m in e["failures"]]
    if failures:
        raise ThresholdMissed("; ".join(failures))
    return entries


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

    pre = data.Preprocessor(recipe.preprocess)
    if opts.val:
        images = data.labeled_set(opts.val, pre, recipe.model.num_classes)
        what = f"labeled validation images from {opts.val}"
    elif report.get("validation"):
        raise DeployError(
            f"{folder} was built with --val: pass --val DIR again (the images are not in the build folder)"
        )
    else:
        cal, q = report.get("calibration") or {}, recipe.quantize
        calib = opts.calib or (None if cal.get("builtin", True) else Path(cal["source"]))
        images = data.calibration_data(
            calib, pre, q.calibration.samples, q.calibration.seed, recipe.verify.heldout
        ).heldout
        what = "held-out calibration images"
    inputs, labels = images.inputs, images.labels
    if len(inputs) > opts.images:
        keep = np.sort(
            np.random.default_rng(recipe.quantize.calibration.seed).choice(len(inputs), opts.images, replace=False)
        )
        inputs, labels = inputs[keep], None if labels is None else labels[keep]
    return np.ascontiguousarray(inputs, np.float32), labels, f"{len(inputs)} {what}"


def measure(device: ssh.Device, files: list[Path], recipe, opts: Options) -> dict:
    """Copy `files` to a new temporary folder on the device, run device_runner.py there (with TMPDIR pointing to
    it, so what onnxruntime writes there goes too), return its JSON; the folder is removed whatever happens (a
    trap on the device, and a separate removal from here)."""
    link = ssh.Ssh(device, opts.timeout, opts.ssh_config, opts.accept_new_host_key)
    py = shlex.quote(opts.python)
    info(f"[{device.url}] checking {opts.python}, onnxruntime and numpy")
    done = link.run(f'd=$(mktemp -d "${{TMPDIR:-/tmp}}/edge-deploy.XXXXXXXX") && echo "$d" && '
                    f"TMPDIR=\"$d\" {py} -c 'import onnxruntime, numpy'")  # fmt: skip
    remote = done.stdout.strip()
    if not ssh.REMOTE_DIR.fullmatch(remote):
        raise DeployError(f"{device.url}: cannot create a temporary folder ({_last_line(done)})")
    try:
        if done.returncode != 0:
            raise DeployError(_probe_failure(device, opts.python, done))
        info(f"[{device.url}] copying {len(files)} files to {remote}")
        link.copy(files, remote)
        lat = recipe.verify.latency
        argv = [opts.python, f"{remote}/{RUNNER.name}", remote, "--protocol", str(PROTOCOL),
                "--warmup", str(lat.warmup), "--runs", str(lat.runs), "--batch", str(lat.batch),
                "--eval-batch", str(recipe.verify.batch),
                "--deadline", str(max(1, math.ceil(link.left())))]  # fmt: skip
        threads = opts.threads or lat.threads
        argv += ["--threads", str(threads)] if threads else []
        cleanup = shlex.quote(f"rm -rf -- {shlex.quote(remote)}")
        info(f"[{device.url}] measuring")
        done = link.run(
            f"trap {cleanup} EXIT; trap 'exit 129' HUP INT TERM; TMPDIR={shlex.quote(remote)} {shlex.join(argv)}"
        )
        return _result(link, done)
    finally:
        _remove(link, remote)


def _last_line(done) -> str:
    err = done.stderr.strip().splitlines()
    return err[-1] if err else f"exit status {done.returncode}"


def _probe_failure(device: ssh.Device, python: str, done) -> str:
    last = _last_line(done)
    for module in ("onnxruntime", "numpy"):
        if f"No module named '{module}'" in done.stderr:
            return (f"{device.url}: {python} on the device cannot import {module}: install it there "
                    f"(pip install {module}) or pass --python with an interpreter that has it")  # fmt: skip
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
    accuracy: dict = {"dataset": dataset, "against": "the host's fp32 logits"}
    if labels is not None:
        accuracy["host_fp32_top1"] = metrics.accuracy(ref, labels)["top1"]
    for p, c in raw.items():
        accuracy[p] = {"agreement": c["agreement"], "sqnr_db": None if math.isinf(c["sqnr_db"]) else c["sqnr_db"]}
        if labels is not None:
            accuracy[p].update(top1=c["int8"]["top1"], top5=c["int8"]["top5"], top1_drop=c["top1_drop"])
    lat = {"runtime": f"onnxruntime-cpu on {device.host}", **{p: m["latency"] for p, m in models.items()}}
    if "int8" in models:
        fp32_ms, int8_ms = result["interleaved_best_ms"]
        lat.update(int8_speedup=lat["fp32"]["p50_ms"] / lat["int8"]["p50_ms"],
                   int8_throughput_speedup=lat["int8"]["throughput_ips"] / lat["fp32"]["throughput_ips"],
                   int8_speedup_interleaved=fp32_ms / int8_ms)  # fmt: skip
        recommended = recommend(recipe.quantize.target, missed, lat)
    else:
        recommended = {"model": "model.fp32.onnx", "precision": "fp32", "reason": "the build has no int8 model"}
    return {
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": result["environment"],
        "accuracy": accuracy,
        "latency": lat,
        "startup_s": {p: m["startup_s"] for p, m in models.items()},
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
