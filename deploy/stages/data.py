"""The data stage: calibration images (and held-out ones without a validation set) and the validation set, from
folders or from the user's data sources; calibration.json lists the calibration files with their checksums."""

from __future__ import annotations

import json

from .. import data, sources
from ..core.context import Build
from ..evalset import EvalSet

BUILTIN_CALIBRATION_WARNING = (
    "calibrated on the built-in sample photos (no --calib given): fine for trying the tool, "
    "not for production; pass --calib DIR with a few hundred images from your deployment domain"
)


class Data:
    name = "data"

    def applies(self, b: Build) -> bool:
        return True

    def run(self, b: Build) -> str:
        r, q, opts = b.recipe, b.recipe.quantize, b.options
        heldout = 0 if opts.val is not None else r.verify.heldout
        shape = (3, r.preprocess.input_size, r.preprocess.input_size)
        pre = data.Preprocessor(r.preprocess)
        if sources.is_folder(opts.calib):
            b.calibration = data.calibration_data(opts.calib, pre, q.calibration.samples, q.calibration.seed, heldout)
        else:
            b.calibration = sources.calibration(opts.calib, shape, q.calibration.samples, q.calibration.seed, heldout)
        if opts.val is not None:
            v, classes = r.verify, r.model.num_classes
            b.validation = (
                data.labeled_set(opts.val, pre, classes, limit=v.val_limit, seed=v.val_seed, workers=v.workers)
                if sources.is_folder(opts.val) else
                sources.evaluation(opts.val, shape, classes, limit=v.val_limit, seed=v.val_seed, workers=v.workers)
            )  # fmt: skip
            b.report["validation"] = {"images": b.validation.n, "class_mapping": b.validation.class_mapping,
                                      **({"sampled": b.validation.sampled} if b.validation.sampled else {})}  # fmt: skip
        else:
            b.heldout = EvalSet.arrays(b.calibration.heldout.inputs)
        b.report["calibration"] = {k: v for k, v in b.calibration.manifest.items() if k != "files"}
        (b.workdir / "calibration.json").write_text(json.dumps(b.calibration.manifest, indent=2) + "\n")
        skipped = len(b.calibration.calib.skipped)
        if skipped:
            b.warn(f"{skipped} unreadable calibration images were skipped (listed in calibration.json)")
        if b.calibration.manifest["builtin"]:
            b.warn(BUILTIN_CALIBRATION_WARNING)
        val = "" if b.validation is None else f", {b.validation.n or 'all the'} validation images"
        return f"{len(b.calibration.calib)} calibration images" + val + (f", {skipped} unreadable skipped" if skipped else "")
