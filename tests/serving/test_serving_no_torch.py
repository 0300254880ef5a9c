"""The serving path without torch: serving.json, Pillow + numpy preprocessing equal to the build's torchvision
transform, and `deploy run` / the Predictor in a fresh interpreter that never imports torch."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy import recipe as recipes
from deploy.errors import DeployError
from deploy.serving import spec as serving_spec
from deploy.serving.preprocess import Preprocess
from helpers import small_build

SERVING = Path(__file__).resolve().parents[2] / "deploy" / "serving"
# what the slim install ([serve]) lacks: none of it may be imported on the serving path
BUILD_STACK = ("torch", "torchvision", "timm", "onnx", "onnxslim", "yaml", "pydantic", "matplotlib", "skimage")


@pytest.fixture(scope="module")
def labeled_build(tmp_path_factory):
    """A real int8 build validated on class folders (cat, cup, rocket) of real photos."""
    import skimage

    root = tmp_path_factory.mktemp("served")
    photos = Path(skimage.__file__).parent / "data"
    for cls, files in {"cat": ["chelsea.png", "astronaut.png"], "cup": ["coffee.png"], "rocket": ["rocket.jpg"]}.items():
        (root / "val" / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(photos / f, root / "val" / cls / f)
    return small_build(root, True, "--val", str(root / "val"))


def test_serving_json_describes_the_recommended_model(labeled_build):
    d = json.loads((labeled_build / "serving.json").read_text())
    report = json.loads((labeled_build / "report.json").read_text())
    assert d["model"] == report["recommended"]["model"] and d["precision"] == report["recommended"]["precision"]
    assert d["input"]["dtype"] == "float32" and d["input"]["shape"][1:] == [3, 64, 64]
    assert isinstance(d["input"]["shape"][0], str) and d["output"]["shape"][1:] == [3]
    assert d["classes"] == ["cat", "cup", "rocket"]  # the validation folders, in class-index order
    assert d["preprocess"] == {"resize": 72, "input_size": 64, "interpolation": "bilinear",
                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}  # fmt: skip
    assert d["max_batch"] == 32 and "serving.json" in report["files"]


def _torchvision(cfg):
    """torchvision's and timm's evaluation transform on a PIL image, as numpy CHW float32."""
    from torchvision.transforms import InterpolationMode, v2

    steps = v2.Compose([v2.Resize(cfg.resize, interpolation=InterpolationMode(cfg.interpolation), antialias=True),
                        v2.CenterCrop(cfg.input_size), v2.PILToTensor()])  # fmt: skip
    mean = np.array(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.array(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return lambda image: (steps(image.convert("RGB")).numpy().astype(np.float32) / 255.0 - mean) / std


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("resize, crop", [(256, 224), (72, 64), (73, 64), (64, 64), (50, 64), (301, 299)])
def test_pillow_preprocessing_equals_the_torchvision_transform(skimage_photos, resize, crop, interpolation):
    cfg = recipes.Preprocess(resize=resize, input_size=crop, interpolation=interpolation)
    mine = Preprocess.from_dict(cfg.model_dump(mode="json"), "test")
    theirs = _torchvision(cfg)
    worst = 0.0
    for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "horse.png"):
        with Image.open(skimage_photos / name) as img:  # RGB, grey and 1-bit photos; portrait and landscape
            img.load()
            for view in (img, img.transpose(Image.Transpose.ROTATE_90), img.crop((0, 0, 301, 157))):
                a, b = mine(view), theirs(view)
                assert a.shape == b.shape == (3, crop, crop) and a.dtype == b.dtype == np.float32
                worst = max(worst, float(np.abs(a - b).max()))
    assert worst <= 1e-6, worst  # measured: 0.0 (torchvision resizes a PIL image with PIL itself)


def test_serving_modules_import_nothing_that_pulls_in_the_build_stack():
    """Every import in deploy/serving is the standard library, numpy, PIL, onnxruntime, the serve extra's packages,
    or a deploy module from this light list (each checked for the same in a fresh interpreter below)."""
    light = {"deploy.errors", "deploy.console", "deploy.serving", "deploy.runtimes.base", "deploy.runtimes.ort",
             "deploy.runtimes.openvino", "deploy.runtimes.tensorrt", "deploy.runtimes.tensorrt.sidecar"}  # fmt: skip
    for path in SERVING.glob("*.py"):
        package, tree = "deploy.serving", ast.parse(path.read_text())
        optional = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try)  # try: import x / except ImportError
                    if any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in t.handlers)
                    for b in t.body for n in ast.walk(b)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                assert target in light or target.startswith("deploy.serving"), f"{path.name} imports {target}"
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                assert not any(n.split(".")[0] in BUILD_STACK for n in names), f"{path.name} imports {names}"
    code = (
        "import sys, importlib; [importlib.import_module(m) for m in sys.argv[1:]]; "
        f"bad = [m for m in sys.modules if m.split('.')[0] in {BUILD_STACK!r}]; assert not bad, bad"
    )
    modules = sorted(light | {f"deploy.serving.{p.stem}" for p in SERVING.glob("*.py") if p.stem != "__init__"})
    run = subprocess.run([sys.executable, "-c", code, *modules], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_deploy_run_and_the_predictor_never_import_torch(labeled_build, skimage_photos):
    photo = skimage_photos / "chelsea.png"
    code = f"""
import sys
from deploy.cli import main
assert main(["run", {str(labeled_build)!r}, {str(photo)!r}, "-k", "3"]) == 0
from deploy.serving.predictor import Predictor
p = Predictor({str(labeled_build)!r})
p.top_k(p.decode(open({str(photo)!r}, "rb").read())[None], 1)
bad = [m for m in sys.modules if m.split('.')[0] in {BUILD_STACK!r}]
assert not bad, bad
"""
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    top = run.stdout.splitlines()[1]
    assert top.startswith(f"{photo}: ") and all(c in top for c in ("cat (", "cup (", "rocket ("))


def test_predictor_matches_the_build_transform_and_reads_older_folders(labeled_build, skimage_photos, tmp_path):
    from deploy.serving.predictor import Predictor

    payload = (skimage_photos / "coffee.png").read_bytes()
    p = Predictor(labeled_build, threads=1)
    report = json.loads((labeled_build / "report.json").read_text())
    build_pre = _torchvision(recipes.Preprocess(**report["recipe"]["preprocess"]))  # what users train with
    with Image.open(skimage_photos / "coffee.png") as img:
        assert np.array_equal(p.decode(payload), build_pre(img))
    old = tmp_path / "old"  # a folder from before serving.json: report.json and the models only
    shutil.copytree(labeled_build, old)
    (old / "serving.json").unlink()
    q = Predictor(old, threads=1)
    assert q.model_file.name == p.model_file.name and q.classes == ["0", "1", "2"]
    assert [x.index for x in q.top_k(q.decode(payload)[None], 3)[0]] == [
        x.index for x in p.top_k(p.decode(payload)[None], 3)[0]
    ]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("preprocess"), "malformed serving description"),
    (lambda d: d.update(schema=7), "schema 7, expected 1"),
    (lambda d: d["preprocess"].update(interpolation="lanczos"), "unsupported preprocessing"),
    (lambda d: d.update(classes=["a"]), "1 class names for a model with 3 outputs"),
])  # fmt: skip
def test_a_damaged_serving_json_is_one_line(labeled_build, tmp_path, edit, message):
    folder = tmp_path / "b"
    shutil.copytree(labeled_build, folder)
    d = json.loads((folder / "serving.json").read_text())
    edit(d)
    (folder / "serving.json").write_text(json.dumps(d))
    with pytest.raises(DeployError, match=message) as err:
        serving_spec.load(folder)
    assert "\n" not in str(err.value)
