"""Training throughput with 1 and more processes (torchrun, gloo on CPUs): `deploy train` on a CIFAR-10 subset.

    python benchmarks/scale_train.py [--cifar DIR] [--recipe recipes/cifar10/mobilenet_v3_small.yaml]
        [--images 5000] [--epochs 1] [--runs 1x2,2x1] [--workers 0]

DIR holds train/ (extracted from ../shared/data/cifar10-jpeg.tar.gz when missing). Each run is PROCESSESxTHREADS:
1 process is plain `deploy train` (no torchrun), N > 1 is `torchrun --nproc-per-node N`; THREADS is each
process's OMP_NUM_THREADS. Every run has the same recipe, seed, images and global batch (train.batch_size; each
of N processes takes 1/N of it). Prints images/s over the training epochs (from the checkpoint's per-epoch
`seconds`: startup and process-group setup excluded), the command's wall time, and the last epoch's loss.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _cifar(folder: Path, tarball: Path) -> Path:
    if not (folder / "train").is_dir():
        print(f"extracting {tarball} to {folder}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tarball) as tar:
            tar.extractall(folder, filter="data")
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(processes: int, threads: int, args, out: Path) -> dict:
    train = ["train", str(args.recipe), "--train", str(args.cifar / "train"), "--out", str(out), "--subset",
             str(args.images), "--epochs", str(args.epochs), "--workers", str(args.workers), "--seed", "0"]  # fmt: skip
    launch = [sys.executable, "-m", "deploy"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes), "--master-port",
        str(_free_port()), "-m", "deploy"]  # fmt: skip
    start = time.perf_counter()
    p = subprocess.run([*launch, *train], env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True,
                       text=True)  # fmt: skip
    wall = time.perf_counter() - start
    if p.returncode:
        sys.exit(f"{processes}x{threads} failed:\n{p.stderr[-3000:]}")
    ckpt = torch.load(out, weights_only=True)
    batch = ckpt["recipe"]["train"]["batch_size"]
    steps = math.ceil(args.images / processes) // (batch // processes)  # per epoch: the loader drops the last partial batch
    seconds = sum(h["seconds"] for h in ckpt["history"])
    return {"run": f"{processes}x{threads}", "world_size": ckpt["history"][-1]["world_size"], "batch": batch,
            "ips": steps * batch * args.epochs / seconds, "seconds": seconds, "wall": wall,
            "loss": ckpt["history"][-1]["loss"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", type=Path, default=Path(tempfile.gettempdir()) / "cifar10")
    ap.add_argument("--tarball", type=Path, default=ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "cifar10" / "mobilenet_v3_small.yaml")
    ap.add_argument("--images", type=int, default=5000, help="training images drawn with seed 0 (train.subset)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--runs", default="1x2,2x1", help="PROCESSESxTHREADS, comma-separated, run in this order")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per process (0: decode in it)")
    args = ap.parse_args()
    args.cifar = _cifar(args.cifar, args.tarball)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, run in enumerate(args.runs.split(",")):
            processes, threads = (int(v) for v in run.split("x"))
            rows.append(_run(processes, threads, args, Path(tmp) / f"w{i}.pth"))
            print(f"{run}: {rows[-1]['ips']:.0f} images/s", flush=True)

    print(f"\n{args.recipe.stem}, {args.images} CIFAR-10 training images, {args.epochs} epoch(s), global batch "
          f"{rows[0]['batch']}, {args.workers} loader workers, {os.cpu_count()} CPUs (gloo)")  # fmt: skip
    print(f"{'processes x threads':<20} {'world size':>10} {'images/s':>9} {'vs first':>8} {'train s':>8} "
          f"{'wall s':>7} {'loss':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['run']:<20} {r['world_size']:>10} {r['ips']:>9.0f} {r['ips'] / rows[0]['ips']:>7.2f}x "
              f"{r['seconds']:>8.1f} {r['wall']:>7.1f} {r['loss']:>7.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
