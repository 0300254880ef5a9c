"""int8 speed-up over ONNX Runtime fp32 per thread count: ours, quantize_static and OpenVINO (issue 18).

    python benchmarks/int8_threads.py --data ../shared/data [--cifar DIR] [--threads 1,2] [--rounds 10]
        [--models lite0,mnv3_224,cifar_mnv3] [--calib-images 64] [--peers auto|off]

Models: EfficientNet-Lite0 (its ImageNet weights) and mobilenet_v3_small at 224x224 (the backbone of the CIFAR-10
checkpoint with a random 1000-class head, as in int8_speed_mobilenet_v3.py), both calibrated on
imagenet-sample/calib of --data; with --cifar (train/ of CIFAR-10 JPEGs), the CIFAR-10 mobilenet_v3_small
checkpoint at 64x64, calibrated on train/.
Variants, all from the same fp32 ONNX and the same --calib-images calibration images: ORT fp32; ours = `deploy
build --int8` (target ort-cpu); onnxruntime's quantize_static with per_channel=True; with --peers auto and
OpenVINO installed (pip install -e '.[peers]'), OpenVINO's CPU plugin on the fp32 ONNX at its default inference
precision (bf16 on CPUs with bf16), NNCF's int8 (nncf.quantize) on OpenVINO, ours on OpenVINO and ours built with
`--target openvino` (the form made for it) on OpenVINO (deploy.runtimes.openvino: compiled for each batch size
(static shapes), latency hint, --threads inference threads).
Timing: all variants of one (model, threads) row in alternating rounds in one process (interleaved_times):
--rounds rounds of 10 batch-1 runs, then of 2 batch-32 runs, per variant. Cells are speed vs fp32 of the
fastest run of each variant (interleaved_best_ms) and, in brackets, of its median run.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from int8_vs_peers import ROOT, _ours, _peer

from deploy import data, models, recipe
from deploy.core.context import BuildOptions
from deploy.runtimes.base import interleaved_times
from deploy.runtimes.openvino import OpenVinoCpu
from deploy.runtimes.ort import OrtCpu, default_threads, exact_int8_kernels

CHECKPOINT = ROOT / "checkpoints" / "mobilenet_v3_small_cifar10.pth"
CIFAR_RECIPE = ROOT / "recipes" / "cifar10" / "mobilenet_v3_small.yaml"
VARIANTS = ["ours int8", "`quantize_static` per-channel", "OpenVINO default", "NNCF int8 on OpenVINO",
            "ours int8 on OpenVINO", "ours `--target openvino` on OpenVINO"]
MODELS = {"lite0": "EfficientNet-Lite0 224", "mnv3_224": "mobilenet_v3_small 224",
          "cifar_mnv3": "CIFAR mobilenet_v3_small 64"}  # fmt: skip


def peers(mode: str) -> tuple | None:
    """(openvino, nncf) modules, or None (and a line saying why) when --peers off or either is not installed."""
    if mode == "off":
        print("OpenVINO / NNCF columns left out ('–'): --peers off")
        return None
    try:
        import nncf
        import openvino
    except ImportError as err:
        print(f"OpenVINO / NNCF columns left out ('–'): {err.name} is not installed (pip install -e '.[peers]')")
        return None
    return openvino, nncf


def mnv3_224_weights(path: Path) -> Path:
    """mobilenet_v3_small with 1000 classes: the CIFAR-10 checkpoint's backbone, a random (seeded) head."""
    torch.manual_seed(0)
    net = models.architecture(recipe.load("mobilenet_v3_small").model)
    state = {k: v for k, v in models.load_checkpoint(CHECKPOINT).items() if not k.startswith("classifier.3.")}
    net.load_state_dict(state, strict=False)
    torch.save(net.state_dict(), path)
    return path


def model_setup(key: str, args, work: Path) -> tuple[recipe.Recipe, Path]:
    """(recipe, calibration folder) of a --models entry."""
    if key == "lite0":
        return recipe.load("efficientnet_lite0"), args.data / "imagenet-sample" / "calib"
    if key == "mnv3_224":
        weights = mnv3_224_weights(work / "mnv3_224.pth")
        r = recipe.override(recipe.load("mobilenet_v3_small"), {"model.weights": str(weights)})
        return r, args.data / "imagenet-sample" / "calib"
    r = recipe.override(recipe.load(str(CIFAR_RECIPE)), {"model.weights": str(CHECKPOINT)})
    return r, args.cifar / "train"


def bench_model(key: str, args, found: tuple | None, work: Path) -> list[dict]:
    """Rows (one per thread count) of {variant: (batch-1 s per run, batch-32 s per run)}, fp32 first."""
    r, calib_dir = model_setup(key, args, work)
    r = recipe.override(r, {"quantize.calibration.samples": args.calib_images})
    fp32, ours, _ = _ours(r, BuildOptions(calib=calib_dir, out=work / "ours"), {"quantize.target": "ort-cpu"})
    # the images the build calibrated on: its draw, after the verify.heldout images it keeps for its own check
    q = r.quantize.calibration
    calib = data.calibration_data(calib_dir, data.Preprocessor(r.preprocess), q.samples, q.seed,
                                  r.verify.heldout).calib.inputs  # fmt: skip
    static = work / "quantize_static.onnx"
    _peer(fp32, static, calib, per_channel=True)
    ov_models = {}
    if found:
        openvino, nncf = found
        dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
        int8 = nncf.quantize(openvino.Core().read_model(str(fp32)), dataset, subset_size=len(calib))
        _, for_openvino, _ = _ours(r, BuildOptions(calib=calib_dir, out=work / "openvino"),
                                   {"quantize.target": "openvino"})  # fmt: skip
        ov_models = {VARIANTS[2]: fp32, VARIANTS[3]: int8, VARIANTS[4]: ours, VARIANTS[5]: for_openvino}
    shape = (3, r.preprocess.input_size, r.preprocess.input_size)
    rows = []
    for t in args.threads:
        rts = {"fp32": OrtCpu(fp32, t), VARIANTS[0]: OrtCpu(ours, t), VARIANTS[1]: OrtCpu(static, t)}
        rts |= {name: OpenVinoCpu(m, t) for name, m in ov_models.items()}
        if found:
            print(f"{MODELS[key]}, {t} thread(s): OpenVINO default inference precision {rts[VARIANTS[2]].precision}")
        b1 = interleaved_times(list(rts.values()), shape, 1, args.rounds, 10)
        b32 = interleaved_times(list(rts.values()), shape, 32, args.rounds, 2)
        rows.append({"model": MODELS[key], "threads": t, **{n: (x, y) for n, x, y in zip(rts, b1, b32)}})
    return rows


def print_tables(rows: list[dict]) -> None:
    for i, title in enumerate(("batch 1: speed vs ORT fp32 (fp32 ms / variant ms)",
                               "batch 32: throughput vs ORT fp32 (variant img/s / fp32 img/s)")):  # fmt: skip
        print(f"\n{title}; each cell: of the fastest run (of the median run)\n")
        unit = "ms" if i == 0 else "img/s @32"
        print(f"| model | threads | ORT fp32 {unit} | " + " | ".join(VARIANTS) + " |\n|" + "---|" * (3 + len(VARIANTS)))
        for row in rows:
            best, median = row["fp32"][i].min(), np.median(row["fp32"][i])
            fp32 = f"{1e3 * best:.3f} ({1e3 * median:.3f})" if i == 0 else f"{32 / best:.0f} ({32 / median:.0f})"
            cells = [f"{best / row[v][i].min():.2f}x ({median / np.median(row[v][i]):.2f}x)" if v in row else "–"
                     for v in VARIANTS]  # fmt: skip
            print(f"| {row['model']} | {row['threads']} | {fp32} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder holding imagenet-sample/")
    p.add_argument("--cifar", type=Path, help="CIFAR-10 JPEGs (train/): adds the cifar_mnv3 row")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=10, help="alternating rounds (10 batch-1 runs, then 2 batch-32 runs)")
    p.add_argument("--models", default="lite0,mnv3_224,cifar_mnv3", help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--calib-images", type=int, default=64, help="calibration images of every int8 variant")
    p.add_argument("--peers", choices=["auto", "off"], default="auto", help="OpenVINO and NNCF columns if installed")
    args = p.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    args.models = args.models.split(",")
    if unknown := set(args.models) - set(MODELS):
        p.error(f"unknown --models: {', '.join(sorted(unknown))}")
    if "cifar_mnv3" in args.models and not args.cifar:
        print("no --cifar: the CIFAR mobilenet_v3_small row is left out")
        args.models.remove("cifar_mnv3")
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    found = peers(args.peers)
    versions = f"; OpenVINO {found[0].get_version()}; NNCF {found[1].__version__}" if found else ""
    print(
        f"{cpu}, {default_threads()} cores; exact int8 kernels (VNNI/AMX): {exact_int8_kernels()}; "
        f"onnxruntime {onnxruntime.__version__}{versions}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            (Path(tmp) / key).mkdir()
            rows += bench_model(key, args, found, Path(tmp) / key)
    print_tables(rows)


if __name__ == "__main__":
    main()
