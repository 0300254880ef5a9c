"""The one runner behind `deploy build`, `deploy.build()` and the tests: the plan's stages in order, each timed,
into a temporary folder that replaces --out only when the build completes (core/output.py).

Under torchrun (docs/distributed.md) rank 0 runs the build as one process would, and the other processes only
help it train. Before the build every process lists the stages that may train (a `may_train(b)` method:
distill, QAT); rank 0 tells the others, stage by stage in that list, whether it applies, and the training stage
hands them its model (deploy.distributed.from_main). Ranks > 0 run nothing else, never touch --out or its lock,
write no report, and stop after the last stage in the list; their Build's workdir is a private temporary
folder, deleted at the end. deploy.build() on them returns that rank's partial report (no files, `rank` set).
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__, distributed
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
    device = None
    if distributed.active():
        from ..train import device_for

        device = device_for(recipe.train)
    with distributed.session(device):
        if not distributed.is_main():
            return _help_train(recipe, opts), out
        with output.replacing(out, opts.force) as tmp:
            b = Build(recipe, opts, tmp, previous=out if output.is_build(out) else None)
            _start_report(b)
            training = _training_stages(b)
            for stage in PLAN:
                applies = stage.applies(b)
                if stage in training:
                    distributed.from_main(applies)
                if applies:
                    with b.stage(stage.name) as entry:
                        entry["notes"] = stage.run(b)
            b.report["passed"] = not b.report["failures"]
            report.write(b.report, tmp)
    info(f"wrote {out}/report.md")
    return b.report, out


def _help_train(recipe: Recipe, opts: BuildOptions) -> dict:
    """Ranks > 0 of a torchrun job: the training stages that rank 0 says apply, in a private workdir."""
    with tempfile.TemporaryDirectory(prefix=f"edge-deploy-rank{distributed.rank()}-") as tmp:
        b = Build(recipe, opts, Path(tmp))
        _start_report(b)
        for stage in _training_stages(b):
            if distributed.from_main(None):
                stage.run(b)
    b.report.update(passed=not b.report["failures"], files=[], rank=distributed.rank())
    return b.report


def _training_stages(b: Build) -> list:
    """The stages of the plan that may train in this build, known before it starts."""
    return [stage for stage in PLAN if hasattr(stage, "may_train") and stage.may_train(b)]


def _start_report(b: Build) -> None:
    b.report.update({
        "schema": 1,
        "tool": {"name": "edge-deploy", "version": __version__},
        "model": b.recipe.model.name,
        "target": b.recipe.quantize.target,
        "int8": b.recipe.quantize.enabled,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": b.recipe.model_dump(mode="json"),
        "stages": [],
        "warnings": [],
        "failures": [],
    })  # fmt: skip
