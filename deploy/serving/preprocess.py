"""The build's evaluation transform in Pillow and numpy, without torch: the same tensor as deploy.data.Preprocessor
(torchvision v2 Resize of the short side on the PIL image, CenterCrop, PILToTensor, /255, normalize)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import DeployError

RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocess:
    resize: int
    input_size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_dict(cls, d: dict, what: str) -> Preprocess:
        """From serving.json's (or a report's recipe's) "preprocess"; a one-line DeployError when malformed."""
        try:
            p = cls(int(d["resize"]), int(d["input_size"]), str(d["interpolation"]), tuple(map(float, d["mean"])),
                    tuple(map(float, d["std"])))  # fmt: skip
        except (KeyError, TypeError, ValueError) as err:
            raise DeployError(f"{what}: malformed preprocessing ({type(err).__name__}: {err})") from None
        if p.resize < 1 or p.input_size < 1 or p.interpolation not in RESAMPLE or len(p.mean) != 3 or len(p.std) != 3:
            raise DeployError(f"{what}: unsupported preprocessing {d}")
        return p

    def __call__(self, image: Image.Image) -> np.ndarray:
        """CHW float32, normalized."""
        image = image.convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        size = (self.resize, int(self.resize * long / short))  # torchvision's rounding: truncate the long side
        new = size if w <= h else size[::-1]
        if new != (w, h):
            image = image.resize(new, resample=RESAMPLE[self.interpolation])
        image = image.crop(_center_box(image.size, self.input_size))  # outside the image: zeros, as torchvision pads
        pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / 255.0
        mean = np.array(self.mean, dtype=np.float32).reshape(3, 1, 1)
        std = np.array(self.std, dtype=np.float32).reshape(3, 1, 1)
        return (pixels - mean) / std


def _center_box(size: tuple[int, int], crop: int) -> tuple[int, int, int, int]:
    """torchvision's CenterCrop box: offsets rounded half to even (Python's round), padding split floor-first."""
    origin = [-((crop - s) // 2) if crop > s else round((s - crop) / 2.0) for s in size]
    return origin[0], origin[1], origin[0] + crop, origin[1] + crop
