"""Safe image decoding: size and aspect ratio are checked from the header before any pixel is decoded.

Limits (defaults, or the environment variables): at most DEPLOY_MAX_IMAGE_PIXELS pixels (50 million) and a long
side at most DEPLOY_MAX_IMAGE_ASPECT times the short one (20). A JPEG above the pixel limit (but below Pillow's
bomb limit, 89 Mpixel) is decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that brings it under;
anything else over a limit is refused. Only JPEG, PNG, WebP, BMP and GIF are opened, and Pillow's
DecompressionBombWarning is an error.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..errors import DeployError

MAX_PIXELS_ENV, MAX_ASPECT_ENV = "DEPLOY_MAX_IMAGE_PIXELS", "DEPLOY_MAX_IMAGE_ASPECT"
DEFAULT_MAX_PIXELS, DEFAULT_MAX_ASPECT = 50_000_000, 20.0
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")  # a camera JPEG may open as "MPO" (a JPEG subclass)
_warnings_lock = threading.Lock()  # warnings.catch_warnings changes process-wide state


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_aspect: float = DEFAULT_MAX_ASPECT

    @classmethod
    def from_env(cls) -> Limits:
        """The defaults, overridden by DEPLOY_MAX_IMAGE_PIXELS / DEPLOY_MAX_IMAGE_ASPECT when set."""
        return cls(int(_env(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)), _env(MAX_ASPECT_ENV, DEFAULT_MAX_ASPECT))


def _env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        value = 0
    if not 1 <= value < math.inf:
        raise DeployError(f"{name}={raw!r}: expected a number of at least 1")
    return value


def open_image(source: bytes | Path, what: str, limits: Limits | None = None) -> Image.Image:
    """The decoded first frame of an image file or its bytes; a one-line DeployError when it is unreadable or
    over the limits (checked before decoding)."""
    limits = limits or Limits.from_env()
    try:
        with _warnings_lock, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            img = Image.open(BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS)
        with img:
            _check(img, limits, what)
            if any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught):
                raise Image.DecompressionBombError  # a warning from Pillow is an error here
            img.load()
            _check(img, limits, what)  # a GIF frame can outgrow the header's size
            return img
    except Image.DecompressionBombError:
        raise DeployError(f"{what}: image too large (over Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise DeployError(f"{what}: not a readable image (unknown format)") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise DeployError(f"{what}: not a readable image ({str(err).splitlines()[0][:120]})") from None


def _check(img: Image.Image, limits: Limits, what: str) -> None:
    """Refuse an image over the limits; shrink an oversized JPEG's decode (Image.draft) when that suffices."""
    w, h = img.size
    if min(w, h) < 1 or max(w, h) / min(w, h) > limits.max_aspect:
        raise DeployError(f"{what}: {w}x{h} image exceeds the {limits.max_aspect:g}:1 aspect-ratio limit "
                          f"({MAX_ASPECT_ENV})")  # fmt: skip
    if w * h <= limits.max_pixels:
        return
    scale = 2 ** math.ceil(math.log2(math.sqrt(w * h / limits.max_pixels)))
    if img.format in ("JPEG", "MPO") and scale <= 8:  # draft() does nothing once decoded
        img.draft(img.mode, (w // scale, h // scale))
        if img.size[0] * img.size[1] <= limits.max_pixels:
            return
    raise DeployError(f"{what}: {w}x{h} image exceeds the {limits.max_pixels:,}-pixel limit ({MAX_PIXELS_ENV})")
