"""`deploy explore`: the width (α) x resolution (ρ) grid of a family, with params, MACs and measured latency.

Each variant is built with random weights (cost does not depend on their values), BN-folded and exported
as `deploy build` does, then timed on ONNX Runtime in fp32 and, unless --no-int8, as the int8 QDQ model
calibrated on the built-in photos. For MobileNetV1 the measured MACs are checked against the paper's
closed form for depthwise-separable convolutions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import DeployError


def _mobilenet_v1(width: float, num_classes: int):
    from .mobilenet_v1 import MobileNetV1

    return MobileNetV1(num_classes=num_classes, width=width)


def _torchvision(name: str, width_arg: str):
    def build(width: float, num_classes: int):
        import torchvision

        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **{width_arg: width})

    return build


def _efficientnet_lite0(width: float, num_classes: int):
    # timm's create_model fixes the channel multiplier per variant name; its generator takes any.
    from timm.models.efficientnet import _gen_efficientnet_lite

    return _gen_efficientnet_lite("efficientnet_lite0", channel_multiplier=width, num_classes=num_classes)


def _shufflenet_v1(groups: int):
    def build(width: float, num_classes: int):
        from .shufflenet_v1 import ShuffleNetV1

        return ShuffleNetV1(groups, width, num_classes)

    return build


def _mnasnet(width: float, num_classes: int):
    import torchvision

    return torchvision.models.MNASNet(alpha=width, num_classes=num_classes)


# Registered models whose family has a width multiplier, and how to build one at any width.
WIDTH_FAMILIES = {
    "mobilenet_v1": _mobilenet_v1,
    "mobilenet_v2": _torchvision("mobilenet_v2", "width_mult"),
    "mobilenet_v3_small": _torchvision("mobilenet_v3_small", "width_mult"),
    "mobilenet_v3_large": _torchvision("mobilenet_v3_large", "width_mult"),
    "mnasnet1_0": _mnasnet,
    "efficientnet_lite0": _efficientnet_lite0,
    **{f"shufflenet_v1_g{g}_x{w}": _shufflenet_v1(g) for g in (3, 8) for w in ("1_0", "0_5")},
}


def explore(name: str, widths: list[float], resolutions: list[int], int8: bool = True, runs: int = 50,
            samples: int = 32, num_classes: int = 1000, threads: int | None = None,
            weights: str | None = None, val: Path | None = None) -> dict:  # fmt: skip
    """Measure every (width, resolution) variant of `name`; with `weights` (a path pattern with {width})
    and `val`, also its fp32 and int8 top-1."""
    import torch

    from . import macs
    from . import recipe as recipes
    from .console import info
    from .runtimes.ort import OrtCpu
    from .stages import export_onnx, fold_bn

    if name not in WIDTH_FAMILIES:
        raise DeployError(f"{name} has no width multiplier here; explore supports {', '.join(WIDTH_FAMILIES)}")
    r = recipes.load(name)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for width in widths:
            with torch.random.fork_rng():
                torch.manual_seed(0)
                try:
                    model = WIDTH_FAMILIES[name](width, num_classes).eval()
                except Exception as err:  # noqa: BLE001 - builders reject odd widths with various errors
                    raise DeployError(f"cannot build {name} at width {width}: {err}") from None
            if weights:
                from . import models

                path = weights.format(width=f"{width:g}")
                models.load_into(model, models.load_checkpoint(Path(path)), path, r.model)
            folded, _ = fold_bn.fold_batchnorm(model)
            for res in resolutions:
                info(f"[explore] {name} width {width} at {res}px")
                row = {"width": width, "resolution": res, **macs.count(model, res)}
                if name == "mobilenet_v1":
                    from .mobilenet_v1 import paper_macs

                    row["closed_form_macs"] = paper_macs(width, res, num_classes)
                    row["closed_form_deviation"] = row["macs"] / row["closed_form_macs"] - 1
                fp32 = Path(tmp) / f"w{width}_r{res}.fp32.onnx"
                export_onnx.export(folded, fp32, r.export, res)
                row["fp32_ms"] = _p50(OrtCpu(fp32, threads), res, runs)
                int8_model = _int8(fp32, r, res, samples) if int8 else None
                if int8_model:
                    row["int8_ms"] = _p50(OrtCpu(int8_model, threads), res, runs)
                if weights:
                    row.update(_top1(fp32, int8_model, r, res, val, num_classes, threads))
                rows.append(row)
    return {"model": name, "weights": weights or "random (cost only; no accuracy)", "runs": runs,
            "threads": _threads(threads), "variants": rows}  # fmt: skip


def _threads(threads: int | None) -> int:
    from .runtimes.ort import default_threads

    return threads or default_threads()


def _p50(rt, res: int, runs: int) -> float:
    return rt.benchmark((3, res, res), batch=1, warmup=max(3, runs // 10), runs=runs).p50_ms


def _int8(fp32: Path, r, res: int, samples: int) -> Path:
    """The ort-cpu int8 QDQ model of `fp32`, calibrated on the built-in photos at this resolution."""
    from . import data
    from .stages.int8 import quantize

    pre = data.Preprocessor(r.preprocess.model_copy(update={"input_size": res, "resize": round(res * 256 / 224)}))
    calib = data.calibration_data(None, pre, samples, 0, 0).calib.inputs[:samples]  # built-in set: all its views
    cfg = r.quantize.model_copy(update={"enabled": True, "target": "ort-cpu"})
    out = fp32.with_suffix("").with_suffix(".int8.onnx")
    quantize.quantize(fp32, out, calib, cfg, fp32.parent / "cache", None)
    return out


def _top1(fp32: Path, int8: Path | None, r, res: int, val: Path, num_classes: int, threads: int | None) -> dict:
    """fp32 (and int8) top-1 on `val`, preprocessed at this resolution."""
    from . import data
    from .runtimes.ort import OrtCpu
    from . import metrics

    pre = data.Preprocessor(r.preprocess.model_copy(update={"input_size": res, "resize": round(res * 256 / 224)}))
    images = data.labeled_set(val, pre, num_classes)
    runtimes = {"fp32": OrtCpu(fp32, threads), **({"int8": OrtCpu(int8, threads)} if int8 else {})}
    got = metrics.logits_many(runtimes, images, 32, "Evaluating " + ", ".join(runtimes))
    return {f"{name}_top1": metrics.accuracy(logits, images.labels)["top1"] for name, logits in got.items()}


def _cells(v: dict) -> list[str]:
    cells = [f"{v['width']:g}", str(v["resolution"]), f"{v['params'] / 1e6:.2f}M", f"{v['macs'] / 1e6:.1f}M"]
    if "closed_form_macs" in v:
        cells += [f"{v['closed_form_macs'] / 1e6:.1f}M", f"{100 * v['closed_form_deviation']:+.2f}%"]
    cells.append(f"{v['fp32_ms']:.3f}")
    if "int8_ms" in v:
        cells += [f"{v['int8_ms']:.3f}", f"{v['fp32_ms'] / v['int8_ms']:.2f}x"]
    cells += [f"{v[k]:.2f}" for k in ("fp32_top1", "int8_top1") if k in v]
    return cells


def _header(result: dict) -> list[str]:
    v = result["variants"][0]
    return (["width α", "input px", "params", "MACs"]
            + (["closed-form MACs", "deviation"] if "closed_form_macs" in v else [])
            + ["fp32 p50 ms"] + (["int8 p50 ms", "int8 speed-up"] if "int8_ms" in v else [])
            + [h for k, h in (("fp32_top1", "fp32 top-1 %"), ("int8_top1", "int8 top-1 %")) if k in v])  # fmt: skip


def table(result: dict) -> str:
    rows = [_header(result), *(_cells(v) for v in result["variants"])]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    title = f"{result['model']}, weights: {result['weights']}, batch-1 p50 on onnxruntime-cpu ({result['threads']} threads)"
    return "\n".join([title, *lines])


def markdown(result: dict, plot_name: str) -> str:
    head = _header(result)
    lines = [f"# Width x resolution: {result['model']}", "",
             f"Weights: {result['weights']}. Batch-1 p50 latency over {result['runs']} runs on onnxruntime-cpu, "
             f"{result['threads']} threads; int8 = ort-cpu QDQ (U8S8) calibrated on the built-in photos. "
             "MACs from torch.utils.flop_counter.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]  # fmt: skip
    lines += ["| " + " | ".join(_cells(v)) + " |" for v in result["variants"]]
    if "closed_form_macs" in result["variants"][0]:
        lines += ["", "Closed form (MobileNetV1 paper, sec. 3.3): D_K²·αM·(ρD_F)² + αM·αN·(ρD_F)² per "
                  "separable "
                  "block, plus the stem convolution and the classifier."]  # fmt: skip
    return "\n".join(lines + ["", f"![latency vs MACs]({plot_name})", ""])


def plot(result: dict, path: Path) -> None:
    """Latency against MACs, one line per width through its resolutions, fp32 solid and int8 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for width in sorted({v["width"] for v in result["variants"]}):
        vs = sorted((v for v in result["variants"] if v["width"] == width), key=lambda v: v["macs"])
        macs = [v["macs"] / 1e6 for v in vs]
        line = ax.plot(macs, [v["fp32_ms"] for v in vs], "o-", label=f"α={width:g} fp32")[0]
        if "int8_ms" in vs[0]:
            ax.plot(macs, [v["int8_ms"] for v in vs], "s--", color=line.get_color(), label=f"α={width:g} int8")
        for v, x in zip(vs, macs):
            ax.annotate(f"{v['resolution']}px", (x, v["fp32_ms"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("MMACs")
    ax.set_ylabel("batch-1 p50 latency, ms")
    ax.set_title(f"{result['model']}: width x resolution on onnxruntime-cpu ({result['threads']} threads)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
