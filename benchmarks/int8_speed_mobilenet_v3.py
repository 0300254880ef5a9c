"""Is int8 faster than fp32 for mobilenet_v3_small on ONNX Runtime's CPU kernels? Per Q/DQ placement.

    nice -n 10 python benchmarks/int8_speed_mobilenet_v3.py [--cifar /tmp/cifar10] [--threads 1,2]
        [--stem-models mobilenet_v3_large,mobilenet_v2,efficientnet_lite0,mnasnet1_0,shufflenet_v2_x1_0]

Speed: torchvision mobilenet_v3_small at 224x224 with 1000 classes, its backbone from the CIFAR-10
checkpoint and a random head (random-init weights give near-constant activations, which no trained model
has and which change what the placement rewrites can do), calibrated on the built-in photos. fp32 and
every int8 variant run in alternating rounds in one process, so load from other processes hits all alike:
batch-1 p50 and batch-32 throughput per thread count, and their ratio to fp32.
Accuracy: the same variants made from the CIFAR-10 checkpoint at 64x64 (recipes/cifar10/
mobilenet_v3_small.yaml), calibrated on 256 training images: top-1 on --test-images test images on this
CPU's kernels and with exact Q/DQ arithmetic (ORT graph optimizations off), drop against fp32.
Profile: ms per op type and per convolution kind (ORT's profiler, batch 1) of fp32 and the fastest variant.
--stem-models: the float_stem rule and depthwise padding against measurement on other models (their offline
weights, else random): batch-1 p50 of fp32, int8 with an int8 stem, with a float stem, and as the build makes it
(the rule's stem, depthwise channels padded), alternating rounds.
tensorrt target: Q/DQ nodes, TensorRT Q/DQ-rule findings (deploy/qdq_check.py) and exact top-1 on CIFAR-10 of
onnxruntime's default placement and of conv_inputs_only (TensorRT itself is not run here).
The variants are made by the build's own quantize stage (deploy/stages/quantize.py) with recipe overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import torch

from deploy import data, models, recipe
from deploy.runtimes.tensorrt import qdq_check
from deploy.runtimes.base import interleaved_times
from deploy.runtimes.ort import OrtCpu, exact_int8_kernels
from deploy import metrics
from deploy.stages import export_onnx, fold_bn
from deploy.stages.int8 import pad_channels, quantize

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "mobilenet_v3_small_cifar10.pth"
CIFAR_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "cifar10" / "mobilenet_v3_small.yaml"
ORT_DEFAULT = {"int8_hard_activations": False, "float_stem": False}
# label -> (quantize overrides, fp32 graph: "pre" = onnxruntime's quant_pre_process, "pad" = depthwise channels
# padded (stages/pad_channels.py, as the build does for ort-cpu), "" = as exported)
VARIANTS = {
    "ORT placement, quant_pre_process (HardSwish split)": (ORT_DEFAULT, "pre"),
    "ORT placement (HardSwish whole; before this issue)": (ORT_DEFAULT, ""),
    "int8 h-swish/h-sigmoid, int8 stem": ({"float_stem": False}, ""),
    "int8 h-swish/h-sigmoid, float stem": ({}, ""),
    "  + depthwise channels padded to 16 (default)": ({}, "pad"),
    "  same, per-tensor weights": ({"per_channel": False}, "pad"),
    "  same, reduce_range (7-bit weights)": ({"reduce_range": True}, "pad"),
}


def export(model: torch.nn.Module, path: Path, r: recipe.Recipe, size: int) -> Path:
    folded, _ = fold_bn.fold_batchnorm(model.eval())
    export_onnx.export(folded, path, r.export, size)
    return path


def padded(fp32: Path, out: Path) -> Path:
    model = onnx.load(str(fp32))
    pad_channels.pad_depthwise(model)
    onnx.save(model, str(out))
    return out


def make_variants(fp32: Path, calib: np.ndarray, base: recipe.Recipe, work: Path) -> dict[str, Path]:
    """Every variant of `fp32`, calibrated once per fp32 graph (the build's range cache is reused)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    sources = {"": fp32, "pre": work / f"{fp32.stem}.pre.onnx", "pad": padded(fp32, work / f"{fp32.stem}.pad.onnx")}
    quant_pre_process(str(fp32), str(sources["pre"]), skip_symbolic_shape=True)
    out, first_cache = {}, {}
    for k, (label, (overrides, graph)) in enumerate(VARIANTS.items()):
        src = sources[graph]
        cfg = recipe.override(base, {"quantize.enabled": True, **{f"quantize.{o}": v for o, v in overrides.items()}})
        out[label] = work / f"{fp32.stem}.v{k}.onnx"
        cache = work / f"cache-{fp32.stem}-{k}"
        quantize.quantize(src, out[label], calib, cfg.quantize, cache, first_cache.get(src))
        first_cache.setdefault(src, cache)
    return out


def timings(paths: list[Path], size: int, threads: int, rounds: int, batch32: bool = True) -> list[dict]:
    """Batch-1 p50 and batch-32 throughput of each model, each measured in alternating rounds (batch 1 first,
    then batch 32: alternating the batch size within a session makes ORT re-plan its memory every run)."""
    rts = [OrtCpu(p, threads) for p in paths]
    out = [{} for _ in rts]
    for batch, runs, key in ((1, 20, "p50_ms"), (32, 2, "ips"))[: 2 if batch32 else 1]:
        for o, t in zip(out, interleaved_times(rts, (3, size, size), batch, rounds, runs)):
            o[key] = float(np.median(t)) * 1e3 if batch == 1 else batch / float(np.median(t))
    return out


def accuracy(paths: dict[str, Path], fp32: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    ref = metrics.accuracy(metrics.logits(OrtCpu(fp32), images, 100, "fp32"), labels)["top1"]
    out = {"fp32": {"top1": ref, "top1_exact": ref}}
    for label, path in paths.items():
        got = metrics.logits(OrtCpu(path), images, 100, label.strip())
        exact = metrics.logits(OrtCpu(path, reference=True), images, 100, label.strip() + " (exact)")
        out[label] = {"top1": metrics.accuracy(got, labels)["top1"],
                      "top1_exact": metrics.accuracy(exact, labels)["top1"]}  # fmt: skip
        out[label]["drop"] = ref - out[label]["top1"]
        out[label]["drop_exact"] = ref - out[label]["top1_exact"]
    return out


def tensorrt_forms(fp32: Path, calib: np.ndarray, r: recipe.Recipe, images, labels, work: Path) -> None:
    ref = metrics.accuracy(metrics.logits(OrtCpu(fp32), images, 100, "fp32"), labels)["top1"]
    print("\n| tensorrt target, CIFAR-10 64x64 | Q/DQ nodes | Q/DQ-rule errors | lost-fusion warnings | top-1 exact "
          "| drop |")
    print("|---|---|---|---|---|---|")
    for label, only in (("onnxruntime's placement", False), ("conv_inputs_only (default)", True)):
        cfg = recipe.override(r, {"quantize.enabled": True, "quantize.target": "tensorrt",
                                  "quantize.conv_inputs_only": only}).quantize  # fmt: skip
        out = work / f"trt-{only}.onnx"
        quantize.quantize(fp32, out, calib, cfg, work / f"cache-trt-{only}", None)
        model = onnx.load(str(out))
        found = qdq_check.check(model)
        qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
        top1 = metrics.accuracy(metrics.logits(OrtCpu(out, reference=True), images, 100, label), labels)["top1"]
        print(f"| {label} | {qdq} | {sum(v.severity == 'error' for v in found)} | "
              f"{sum(v.severity == 'warning' for v in found)} | {top1:.2f} | {ref - top1:.2f} |")


def other_models(names: list[str], size: int, threads: int, rounds: int, work: Path) -> None:
    """The float_stem rule and depthwise padding against measurement on other models."""
    from deploy.errors import DeployError
    from deploy.stages.int8 import qdq_placement

    print(f"\n| model ({size}x{size}, batch 1, {threads} thread(s)) | float_stem rule | fp32 p50 ms | int8 stem "
          "| float stem | build default (rule + padded depthwise) | depthwise convs padded |\n|---|---|---|---|---|---|---|")
    for name in names:
        r = recipe.override(recipe.load(name), {"preprocess.input_size": size, "preprocess.resize": size})
        try:
            net = models.build(r.model)
        except DeployError:
            net = models.architecture(r.model)  # random weights: timing only
        fp32 = export(net, work / f"{name}.onnx", r, size)
        pad = onnx.load(str(fp32))
        count = len(pad_channels.pad_depthwise(pad))
        onnx.save(pad, str(work / f"{name}.pad.onnx"))
        calib = data.calibration_data(None, data.Preprocessor(r.preprocess), 16, 0, 0).calib.inputs
        paths = [fp32]
        for src, stem in ((fp32, False), (fp32, True), (work / f"{name}.pad.onnx", None)):
            cfg = recipe.override(r, {"quantize.enabled": True, "quantize.float_stem": stem}).quantize
            paths.append(work / f"{name}-{stem}.onnx")
            quantize.quantize(src, paths[-1], calib, cfg, work / f"cache-{name}-{stem}", None)
        model = onnx.load(str(fp32))
        rule = qdq_placement.float_stem_pays(model, qdq_placement.stem_nodes(model))
        t = [x["p50_ms"] for x in timings(paths, size, threads, rounds, batch32=False)]
        print(f"| {name} | {'float' if rule else 'int8'} | {t[0]:.3f} | "
              + " | ".join(f"{v:.3f} ({t[0] / v:.2f}x)" for v in t[1:]) + f" | {count} |")


def cifar_sets(root: Path, r: recipe.Recipe, n_test: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """256 calibration images from train/, the first n_test/10 test images of each class (sorted names)."""
    pre = data.Preprocessor(r.preprocess)
    calib = data.calibration_data(root / "train", pre, 256, 0, 0).calib.inputs
    classes = sorted(d.name for d in (root / "test").iterdir() if d.is_dir())
    paths = [f for c in classes for f in sorted((root / "test" / c).iterdir())[: n_test // len(classes)]]
    images, kept, _ = data.preprocess(paths, pre, "test")
    labels = np.array([classes.index(paths[i].parent.name) for i in kept])
    return calib, images, labels


def profile(path: Path, size: int, threads: int, runs: int = 200, warmup: int = 20) -> list[tuple[str, str, float]]:
    """(node name, op type, ms per run) from ORT's profiler at batch 1, warm-up runs left out."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.enable_profiling = True
    opts.profile_file_prefix = str(path.with_suffix(""))
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)
    for _ in range(warmup + runs):
        sess.run(None, {"input": x})
    trace = Path(sess.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    total: dict[tuple[str, str], float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[warmup]:
            total[(e["name"][: -len("_kernel_time")], e["args"]["op_name"])] += e["dur"]
    return [(name, op, us / 1e3 / runs) for (name, op), us in total.items()]


def conv_kinds(fp32: Path) -> dict[str, str]:
    """Convolution kind by the names ORT's profiler gives its (fused) kernels: the original Conv's name (int8)
    or the name of its output / of the activation fused into it (fp32, NCHWc)."""
    model = onnx.load(str(fp32))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(model).graph.value_info}  # fmt: skip
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    kinds = {}
    for n in model.graph.node:
        if n.op_type != "Conv":
            continue
        w, out = weights[n.input[1]], shapes.get(n.output[0], [0, 0, 0, 0])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        kind = ("stem (3 input channels)" if w[1] == 3 and group == 1 else
                "depthwise" if group > 1 else
                "squeeze-excite 1x1 (pooled)" if out[2] * out[3] == 1 else "pointwise 1x1")  # fmt: skip
        kinds[n.name] = kinds[n.output[0]] = kind
        for user in (u for u in model.graph.node if n.output[0] in u.input):
            kinds[user.output[0]] = kind  # an activation ORT fuses into the fp32 conv
    return kinds


def _kind(name: str, kinds: dict[str, str]) -> str | None:
    for suffix in ("_nchwc", ""):
        base = name.removesuffix(suffix)
        base = base.rsplit("_token_", 1)[0]
        if base in kinds:
            return kinds[base]
    return None


def print_profile(fp32: Path, best: tuple[str, Path], size: int, threads: int) -> None:
    kinds = conv_kinds(fp32)
    rows = {"fp32": profile(fp32, size, threads), best[0].strip(): profile(best[1], size, threads)}
    print(f"\nORT profiler, batch 1, {threads} thread(s), {size}x{size}: ms per run (kernel time; the profiler adds "
          "overhead per node, so totals exceed the p50 above)")
    for title, key in (("op type", lambda name, op: op), ("convolution kind", lambda name, op: _kind(name, kinds))):
        sums = {label: defaultdict(float) for label in rows}
        for label, entries in rows.items():
            for name, op, ms in entries:
                k = key(name, op)
                if k is not None and (title == "op type" or "Conv" in op):
                    sums[label][k] += ms
        labels = list(rows)
        print(f"\n| {title} | " + " | ".join(labels) + " |\n|---|" + "---|" * len(labels))
        for k in sorted(set().union(*sums.values()), key=lambda k: -max(s.get(k, 0) for s in sums.values())):
            print(f"| {k} | " + " | ".join(f"{sums[label].get(k, 0):.3f}" for label in labels) + " |")
        print("| total | " + " | ".join(f"{sum(sums[label].values()):.3f}" for label in labels) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", type=Path, default=Path("/tmp/cifar10"), help="CIFAR-10 JPEGs: train/ and test/")
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224, help="input size of the speed model")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--rounds", type=int, default=15,
                   help="alternating rounds (20 batch-1 runs, then 2 batch-32 runs, per model)")
    p.add_argument("--stem-models", default="", help="comma-separated recipe names for the float_stem check")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.manual_seed(0)
    base = recipe.load("mobilenet_v3_small")
    cifar = recipe.override(recipe.load(str(CIFAR_RECIPE)), {"model.weights": str(CHECKPOINT)})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        net = models.architecture(base.model)
        state = {k: v for k, v in models.load_checkpoint(CHECKPOINT).items() if not k.startswith("classifier.3.")}
        net.load_state_dict(state, strict=False)  # the 1000-class head stays random
        fp32 = export(net, work / "speed.onnx", base, args.size)
        pre = data.Preprocessor(recipe.override(base, {"preprocess.input_size": args.size,
                                                       "preprocess.resize": args.size}).preprocess)  # fmt: skip
        speed = make_variants(fp32, data.calibration_data(None, pre, 32, 0, 0).calib.inputs, base, work)
        acc, cifar_data = None, (args.cifar / "train").is_dir() and (args.cifar / "test").is_dir()
        if cifar_data:
            calib, images, labels = cifar_sets(args.cifar, cifar, args.test_images)
            c_fp32 = export(models.build(cifar.model), work / "cifar.onnx", cifar, cifar.preprocess.input_size)
            acc = accuracy(make_variants(c_fp32, calib, cifar, work), c_fp32, images, labels)
        else:
            print(f"no CIFAR-10 at {args.cifar}: speed only")

        paths = [fp32, *speed.values()]
        labels_ = ["fp32", *speed]
        results = {t: timings(paths, args.size, t, args.rounds) for t in threads}
        print(f"\nmobilenet_v3_small, ONNX Runtime CPU, {os.cpu_count()} cores, exact int8 kernels (VNNI/AMX): "
              f"{exact_int8_kernels()}; speed at {args.size}x{args.size}, accuracy on CIFAR-10 64x64 "
              f"({args.test_images} test images)")  # fmt: skip
        head = "".join(f" b1 p50 ms {t}t | vs fp32 | b32 img/s {t}t | vs fp32 |" for t in threads)
        print(f"\n| variant |{head} top-1 | drop | top-1 exact | drop exact |")
        print("|---|" + "---|" * (4 * len(threads) + 4))
        for i, label in enumerate(labels_):
            cells = "".join(
                f" {results[t][i]['p50_ms']:.3f} | {results[t][0]['p50_ms'] / results[t][i]['p50_ms']:.2f}x |"
                f" {results[t][i]['ips']:.0f} | {results[t][i]['ips'] / results[t][0]['ips']:.2f}x |" for t in threads
            )  # fmt: skip
            a = acc.get(label) if acc else None
            accs = (f" {a['top1']:.2f} | {a.get('drop', 0):.2f} | {a['top1_exact']:.2f} | "
                    f"{a.get('drop_exact', 0):.2f} |" if a else " n/a | n/a | n/a | n/a |")  # fmt: skip
            print(f"| {label} |{cells}{accs}")
        for t in threads:
            best = max(speed, key=lambda label: results[t][0]["p50_ms"] / results[t][labels_.index(label)]["p50_ms"])
            print_profile(fp32, (best, speed[best]), args.size, t)
        if cifar_data:
            tensorrt_forms(c_fp32, calib, cifar, images, labels, work)
        if args.stem_models:
            other_models(["mobilenet_v3_small", *args.stem_models.split(",")], args.size, threads[0], args.rounds, work)


if __name__ == "__main__":
    main()
