"""deploy.serving.images: size and aspect limits checked before decoding, in the server's decode and in data loading."""

import io
import shutil

import pytest
from PIL import Image

from deploy import data, recipe
from deploy.errors import DeployError
from deploy.serving.images import Limits, open_image
from helpers import bomb_png


def _encoded(size, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("size, message", [
    ((1_000_000, 1), "x: 1000000x1 image exceeds the 20:1 aspect-ratio limit (DEPLOY_MAX_IMAGE_ASPECT)"),
    ((12000, 12000), "x: 12000x12000 image exceeds the 50,000,000-pixel limit (DEPLOY_MAX_IMAGE_PIXELS)"),
])  # fmt: skip
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the check below opens the bomb
def test_bombs_are_refused_from_the_header(size, message):
    assert Image.open(io.BytesIO(bomb_png(*size))).size == size  # a valid PNG of that size
    with pytest.raises(DeployError) as err:
        open_image(bomb_png(*size), "x")
    assert str(err.value) == message


def test_pillows_bomb_warning_is_an_error_when_our_limit_is_raised():
    payload = bomb_png(10000, 10000)  # 100 Mpixel: Pillow only warns (89M..179M)
    with pytest.raises(DeployError, match="decompression-bomb limit"):
        open_image(payload, "x", Limits(max_pixels=10**9))
    assert open_image(bomb_png(7000, 7000), "x", Limits(max_pixels=10**9)).size == (7000, 7000)


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DEPLOY_MAX_IMAGE_PIXELS", "5000")
    monkeypatch.setenv("DEPLOY_MAX_IMAGE_ASPECT", "2")
    assert Limits.from_env() == Limits(5000, 2.0)
    assert open_image(bomb_png(70, 70), "x").size == (70, 70)
    with pytest.raises(DeployError, match="5,000-pixel limit"):
        open_image(bomb_png(80, 80), "x")
    with pytest.raises(DeployError, match="2:1 aspect-ratio limit"):
        open_image(bomb_png(60, 20), "x")
    for bad in ("lots", "inf", "0.5"):
        monkeypatch.setenv("DEPLOY_MAX_IMAGE_ASPECT", bad)
        with pytest.raises(DeployError, match=f"DEPLOY_MAX_IMAGE_ASPECT='{bad}': expected a number of at least 1"):
            Limits.from_env()


def test_an_oversized_jpeg_is_decoded_at_a_reduced_scale():
    jpeg = _encoded((4000, 3000), "JPEG")
    img = open_image(jpeg, "j", Limits(max_pixels=5_000_000))  # 12 Mpixel: 1/2 scale fits
    assert img.size == (2000, 1500) and img.getpixel((1000, 750)) == pytest.approx((200, 30, 90), abs=3)
    assert open_image(jpeg, "j", Limits(max_pixels=200_000)).size == (500, 375)  # 1/8
    with pytest.raises(DeployError, match="100,000-pixel limit"):  # would need 1/16
        open_image(jpeg, "j", Limits(max_pixels=100_000))
    with pytest.raises(DeployError, match="5,000,000-pixel limit"):  # a PNG cannot be reduced on decode
        open_image(_encoded((3000, 2000), "PNG"), "p", Limits(max_pixels=5_000_000))


def test_only_common_web_formats_are_opened(tmp_path):
    assert open_image(_encoded((40, 30), "WEBP"), "w").size == (40, 30)
    with pytest.raises(DeployError, match="t.tif: not a readable image \\(unknown format\\)"):
        open_image(_encoded((40, 30), "TIFF"), "t.tif")
    (tmp_path / "x.bmp").write_bytes(_encoded((40, 30), "BMP"))
    assert open_image(tmp_path / "x.bmp", "x.bmp").size == (40, 30)  # a path works as well as bytes


def test_data_loading_skips_and_counts_bombs(small_val, skimage_photos):
    r = recipe.override(recipe.load("mobilenet_v2"), {"preprocess.input_size": 32, "preprocess.resize": 36})
    pre = data.Preprocessor(r.preprocess)
    bombs = [small_val / "c" / "wide.png", small_val / "c" / "huge.png"]
    bombs[0].write_bytes(bomb_png(1_000_000, 1))
    bombs[1].write_bytes(bomb_png(12000, 12000))
    s = data.labeled_set(small_val, pre, 3)
    s.load()
    assert len(s) == 5 and sorted(s.skipped) == sorted(map(str, bombs))
    shutil.rmtree(small_val / "a")
    shutil.rmtree(small_val / "b")
    (small_val / "c" / "retina.jpg").unlink()
    with pytest.raises(DeployError, match="none of the 2 validation images could be read"):
        data.labeled_set(small_val, pre, 1).load()
