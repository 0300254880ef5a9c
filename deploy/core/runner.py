"""The one runner behind `deploy build`, `deploy.build()` and the tests: the plan's stages in order, each timed,
into a temporary folder that replaces --out only when the build completes (core/output.py)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..console import info
from ..recipe import Recipe
from . import output, report
from .context import Build, BuildOptions
from .plan import PLAN


def default_out(recipe: Recipe) -> Path:
    return Path("build") / recipe.model.name


def build(recipe: Recipe, opts: BuildOptions) -> tuple[dict, Path]:
    """Run every stage of the plan that applies to `recipe` into its output folder; return report.json's content
    and the folder. A missed threshold is in the report's `failures` (`passed` false): callers decide what it
    means (the CLI exits 1)."""
    for stage in PLAN:
        if hasattr(stage, "preflight"):
            stage.preflight(recipe)
    out = (opts.out or default_out(recipe)).resolve()
    with output.replacing(out, opts.force) as tmp:
        b = Build(recipe, opts, tmp, previous=out if output.is_build(out) else None)
        b.report.update({
            "schema": 1,
            "tool": {"name": "edge-deploy", "version": __version__},
            "model": recipe.model.name,
            "target": recipe.quantize.target,
            "int8": recipe.quantize.enabled,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "recipe": recipe.model_dump(mode="json"),
            "stages": [],
            "warnings": [],
            "failures": [],
        })  # fmt: skip
        for stage in PLAN:
            if stage.applies(b):
                with b.stage(stage.name) as entry:
                    entry["notes"] = stage.run(b)
        b.report["passed"] = not b.report["failures"]
        report.write(b.report, tmp)
    info(f"wrote {out}/report.md")
    return b.report, out
