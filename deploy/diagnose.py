"""`deploy diagnose`: which layers int8 hurts, per deploy/stages/int8/sensitivity.py, and optionally the
mixed-precision fix.

It builds the model as `deploy build --int8` does (into OUT/build; a threshold the build misses is reported, not
fatal) or takes an existing build folder, then writes diagnose.json, diagnose.md and diagnose.png to OUT.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import DeployError


def run(args: argparse.Namespace) -> int:
    from . import data
    from .core import report
    from .evalset import EvalSet
    from .stages.int8.sensitivity import analyze, worst

    if args.top <= 0 or args.sqnr_images <= 0 or args.images < 0:
        raise DeployError("--top and --sqnr-images must be positive, --images at least 0")
    folder = Path(args.model)
    build, recipe, calib_dir, heldout = (_existing_build(folder, args) if folder.is_dir() else
                                         (None, _recipe(args), args.calib, args.val is None))  # fmt: skip
    out = args.out or Path("build") / "diagnose" / f"{recipe.model.name}-{recipe.quantize.target}"
    if build is None:
        build = _build(recipe, args, out / "build")
    out.mkdir(parents=True, exist_ok=True)

    # the images exactly as the build drew them, so that its cached calibration ranges apply
    pre, q = data.Preprocessor(recipe.preprocess), recipe.quantize
    cal = data.calibration_data(calib_dir, pre, q.calibration.samples, q.calibration.seed,
                                recipe.verify.heldout if heldout else 0)  # fmt: skip
    if args.val:
        val = data.labeled_set(args.val, pre, recipe.model.num_classes)
    elif cal.heldout is None:
        raise DeployError(f"{build} was built with --val: pass --val again for the images to evaluate on")
    else:
        val = EvalSet.arrays(cal.heldout.inputs)
    kinds = () if not args.images else ("excluded",) if args.no_alone else ("excluded", "alone")
    # the fp32 model the int8 one was quantized from (equalized, padded or fine-tuned by QAT: deploy/stages/int8/)
    source = build / json.loads((build / "report.json").read_text())["quantize"].get("source", "model.fp32.onnx")
    result = analyze(source, build / "model.int8.onnx", cal.calib.inputs, val, q,
                     build / "calibration-cache", args.sqnr_images, args.images, kinds, args.threads)  # fmt: skip
    result = {"schema": 1, "model": recipe.model.name, "target": q.target, "build": str(build.resolve()),
              "dataset": f"{min(args.images, len(val))} of {len(val)} {'labeled validation' if args.val else 'held-out'} images",
              **result}  # fmt: skip
    result["plot"] = report.sensitivity_plot(result, out / "diagnose.png", f"{recipe.model.name} ({q.target})")
    if args.mixed_precision:
        result["mixed_precision"] = _mixed_precision(result, recipe, args, source, out, cal.calib.inputs, val)
    (out / "diagnose.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "diagnose.md").write_text(_markdown(result, args.top))
    _print_table(result, worst(result["layers"], args.top, result["ranking"]))
    print(f"\nwrote {out}/diagnose.json, diagnose.md and diagnose.png")
    return 0 if result.get("mixed_precision", {}).get("met", True) else 1


def _recipe(args: argparse.Namespace):
    from . import recipe as recipes

    r = recipes.load(args.model)
    overrides = {"quantize.enabled": True, "quantize.target": args.target, "model.weights": args.weights,
                 "model.num_classes": args.num_classes, "verify.latency.threads": args.threads}  # fmt: skip
    return recipes.override(r, {k: v for k, v in overrides.items() if v is not None})


def _build(recipe, args: argparse.Namespace, out: Path) -> Path:
    from .console import warn
    from .core.context import BuildOptions
    from .core.runner import build

    report, _ = build(recipe, BuildOptions(calib=args.calib, val=args.val, out=out, force=True))
    if report["failures"]:
        warn(f"the build misses a threshold ({'; '.join(report['failures'])}); diagnosing it")
    return out


def _existing_build(folder: Path, args: argparse.Namespace):
    from . import recipe as recipes

    files = [folder / f for f in ("report.json", "model.fp32.onnx", "model.int8.onnx")]
    if not all(f.is_file() for f in files):
        raise DeployError(f"{folder} is not an int8 build folder (needs report.json, model.fp32.onnx, model.int8.onnx)")
    if args.weights or args.num_classes:
        raise DeployError("--weights and --num-classes apply to a model to build, not to a build folder")
    report = json.loads((folder / "report.json").read_text())
    recipe = recipes.validate(report["recipe"], str(folder / "report.json"))
    if args.target and args.target != recipe.quantize.target:
        raise DeployError(f"{folder} was built for {recipe.quantize.target}, not --target {args.target}")
    calib = args.calib or (None if report["calibration"]["builtin"] else Path(report["calibration"]["source"]))
    return folder, recipe, calib, report["calibration"]["heldout"] > 0


def _mixed_precision(result: dict, recipe, args, source: Path, out: Path, calib, images) -> dict:
    from .console import warn
    from .stages.int8.mixed_precision import MixedPrecisionFailed, fallback

    updates = {"max_top1_drop": args.max_top1_drop} if args.max_top1_drop is not None else {}
    thresholds = recipe.verify.model_copy(update=updates)
    cfg = recipe.quantize
    if args.max_float_layers:
        cfg = cfg.model_copy(update={"mixed_precision": cfg.mixed_precision.model_copy(
            update={"max_float_layers": args.max_float_layers})})  # fmt: skip
    ranked = None
    if result["ranking"] == "excluded_gain_db":
        ranked = [r["node"] for r in sorted(result["layers"], key=lambda r: -r.get("excluded_gain_db", 0))
                  if r.get("excluded_gain_db", 0) > 0]  # fmt: skip
    try:
        record = fallback(source, calib, images, cfg, thresholds, out / "model.mixed.onnx",
                          source.parent / "calibration-cache", ranked, args.threads)  # fmt: skip
    except MixedPrecisionFailed as err:
        warn(str(err))
        return {**err.record, "error": str(err)}
    return record


def _markdown(result: dict, top: int) -> str:
    from .core import report

    lines = [f"# Int8 sensitivity: {result['model']} ({result['target']})", "",
             f"Build: `{result['build']}`. Variants on {result['dataset']}.", ""]  # fmt: skip
    lines += report.sensitivity_markdown(result, top)
    mp = result.get("mixed_precision")
    if mp:
        lines += ["## Mixed precision", ""]
        i8 = mp["int8"]
        lines.append(f"All int8 on {mp['images']} images: {_fig(i8)}" + (f"; misses: {'; '.join(i8['missed'])}." if i8["missed"] else "."))
        if mp.get("steps"):
            lines += ["", "| float layers | added | top-1 drop | agreement % | logit SQNR dB | ms (all-int8 ms) | slowdown |",
                      "|---|---|---|---|---|---|---|"]  # fmt: skip
            for k, s in enumerate(mp["steps"], 1):
                lines.append(f"| {k} | `{s['added']}` | {report._fmt(s.get('top1_drop'))} | {s['agreement']:.1f} | "
                             f"{report._fmt(s['sqnr_db'], '.1f')} | {s['ms']:.2f} ({s['int8_ms']:.2f}) | {s['slowdown']:.2f}x |")  # fmt: skip
        lines.append("")
        if mp.get("met") and mp.get("latency"):
            lat = mp["latency"]
            lines.append(f"**Met** with {len(mp['float_layers'])} layers in float: batch-1 p50 {lat['p50_ms']:.2f} ms vs "
                         f"{lat['int8_p50_ms']:.2f} ms all-int8 ({lat['slowdown']:.2f}x).")  # fmt: skip
        elif mp.get("met"):
            lines.append("**Met** by the all-int8 model: nothing kept in float.")
        else:
            lines.append(f"**Not met:** {mp['error']}")
        lines.append("")
    return "\n".join(lines)


def _fig(f: dict) -> str:
    drop = f"top-1 drop {f['top1_drop']:.2f} points, " if "top1_drop" in f else ""
    sqnr = "exact" if f["sqnr_db"] is None else f"{f['sqnr_db']:.1f} dB"
    return f"{drop}agreement {f['agreement']:.1f}%, logit SQNR {sqnr}"


def _print_table(result: dict, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    variants = "base" in result
    t = Table(title=f"{result['model']} ({result['target']}): worst layers by {result['ranking']}")
    for col in ["#", "layer", "op", "SQNR dB", "lost dB"] + (["in float: +dB", "agreement %", "alone: SQNR dB"]
                                                              if variants else []):  # fmt: skip
        t.add_column(col, justify="left" if col in ("layer", "op") else "right", overflow="fold")

    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    for i, r in enumerate(rows, 1):
        cells = [str(i), r["node"], r["op_type"], f(r["sqnr_db"]), f(r["lost_db"])]
        if variants:
            cells += [f(r.get("excluded_gain_db"), ".2f"), f(r.get("excluded", {}).get("agreement")),
                      f(r.get("alone", {}).get("sqnr_db"))]  # fmt: skip
        t.add_row(*cells)
    Console().print(t)
    mp = result.get("mixed_precision")
    if mp and mp.get("met"):
        print(f"mixed precision: {len(mp['float_layers'])} layers in float meet {', '.join(mp['thresholds'])}: "
              + (", ".join(mp["float_layers"]) or "none needed"))  # fmt: skip
    elif mp:
        print(mp["error"])
