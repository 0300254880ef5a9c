"""The Python API on a network the tool has never seen: a CNN class defined here, trained briefly on CIFAR-10,
then pruned, distilled, folded, exported, quantized and verified through `deploy.build`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import deploy
from deploy.cli import main
from deploy.errors import DeployError

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class TinyNet(nn.Module):
    """A user's own compact CNN: conv-BN-ReLU6 stem, two depthwise-separable blocks, a residual, a linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()

        def cbr(cin, cout, k=3, stride=1, groups=1):
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU6())  # fmt: skip

        self.stem = cbr(3, width, stride=2)
        self.block1 = nn.Sequential(cbr(width, width, groups=width), cbr(width, 2 * width, k=1))
        self.block2 = nn.Sequential(cbr(2 * width, 2 * width, groups=2 * width), cbr(2 * width, 2 * width, k=1))
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.block1(self.stem(x))
        x = x + self.block2(x)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _copy(subset, dest: Path, n: int) -> Path:
    """The first `n` files of an ImageFolder Subset as class folders under `dest`."""
    for i in subset.indices[:n]:
        path = Path(subset.dataset.samples[i][0])
        (dest / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dest / path.parent.name / path.name)
    return dest


def _transform(augment: bool = False):
    from torchvision import transforms as T

    steps = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
    return T.Compose([*steps, T.ToTensor(), T.Normalize(MEAN, STD)])


@pytest.fixture(scope="module")
def cifar(cifar10):
    from torchvision.datasets import ImageFolder

    train = ImageFolder(str(cifar10 / "train"), _transform())
    test = ImageFolder(str(cifar10 / "test"), _transform())
    pick = np.random.default_rng(0).permutation(len(train))
    return {
        "root": cifar10,
        "train": torch.utils.data.Subset(ImageFolder(str(cifar10 / "train"), _transform(augment=True)), pick[:4000].tolist()),
        "calib": torch.utils.data.Subset(train, sorted(pick[4000:4256].tolist())),
        "val": torch.utils.data.Subset(test, np.random.default_rng(1).permutation(len(test))[:1000].tolist()),
    }  # fmt: skip


@pytest.fixture(scope="module")
def trained(cifar) -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    loader = torch.utils.data.DataLoader(cifar["train"], batch_size=64, shuffle=True)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    return net.eval()


pytestmark = pytest.mark.data


def test_build_your_own_module_end_to_end(tmp_path, cifar, trained):
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    val = torch.utils.data.DataLoader(cifar["val"], batch_size=100)
    result = deploy.build(trained, calib=cifar["calib"], val=val, train=cifar["train"], out=tmp_path / "b",
                          int8=True, prune=0.3, distill=True, input_size=32, resize=32, mean=MEAN, std=STD,
                          **{"distill.epochs": 1, "verify.latency.runs": 10})  # fmt: skip
    r = json.loads((tmp_path / "b" / "report.json").read_text())
    assert result.report == r and result.passed, result.failures
    assert r["recipe"]["model"] == {**r["recipe"]["model"], "source": "python", "name": "TinyNet", "num_classes": 10}
    assert [s["name"] for s in r["stages"]][:6] == ["load", "data", "prune", "distill", "fold_bn", "export_onnx"]
    assert r["prune"]["after"]["macs"] < 0.8 * r["prune"]["before"]["macs"]
    acc = r["accuracy"]
    assert acc["fp32"]["n"] == 1000 and acc["fp32"]["top1"] > 25  # well above chance (10%): a trained model, pruned
    assert acc["top1_drop"] <= r["recipe"]["verify"]["max_top1_drop"]
    assert result.int8_onnx == tmp_path / "b" / "model.int8.onnx" and result.recommended.is_file()
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())  # the user's module untouched
    # what is served is what was built: the predictor's top-1 on a validation image is the build's int8 model's
    x, _ = cifar["val"][0]
    p = result.predictor()
    assert p.top_k(x[None].numpy(), 1)[0][0].index == int(p.runtime.infer(x[None].numpy()).argmax())


def test_a_dataset_calibrates_like_the_same_images_in_a_folder(tmp_path, cifar, trained):
    from torchvision.datasets import ImageFolder

    calib, val = _copy(cifar["calib"], tmp_path / "calib", 64), _copy(cifar["val"], tmp_path / "val", 500)
    common = dict(int8=True, input_size=32, resize=32, mean=MEAN, std=STD, samples=64,
                  **{"verify.latency.runs": 5, "quantize.sensitivity_images": 0})  # fmt: skip
    a = deploy.build(trained, calib=calib, val=val, out=tmp_path / "a", **common)
    # the same files in the same (sorted) order, decoded by torchvision; the transform drops the labels
    b = deploy.build(trained, calib=deploy.Dataset(ImageFolder(str(calib), _transform()), lambda item: item[0]),
                     val=torch.utils.data.DataLoader(ImageFolder(str(val), _transform()), batch_size=50),
                     out=tmp_path / "b", **common)  # fmt: skip
    ranges = [sorted((r.out / "calibration-cache").glob("ranges-*.json")) for r in (a, b)]
    assert [p.name for p in ranges[0]] == [p.name for p in ranges[1]]  # same key: same model and image bytes
    assert ranges[0][0].read_text() == ranges[1][0].read_text()
    assert a.accuracy["fp32"] == b.accuracy["fp32"] and a.accuracy["int8"] == b.accuracy["int8"]
    assert a.accuracy["fp32"]["n"] == 500 and b.report["calibration"]["source"] == "python: ImageFolder"


def test_evaluate_metrics_gate_the_build(tmp_path, cifar, trained):
    x = torch.stack([cifar["val"][i][0] for i in range(200)])
    y = np.array([cifar["val"][i][1] for i in range(200)])

    def evaluate(predict):
        logits = predict(x)
        return {"accuracy": float((logits.argmax(1) == y).mean()), "mean_logit": float(logits.mean())}

    common = dict(calib=cifar["calib"], int8=True, input_size=32, resize=32, mean=MEAN, std=STD,
                  **{"verify.latency.runs": 5, "quantize.sensitivity_images": 0})  # fmt: skip
    recipe = deploy.load_recipe("mobilenet_v3_small").model_copy(deep=True)
    gated = deploy.build(trained, recipe=recipe, evaluate=evaluate, out=tmp_path / "a", **common,
                         **{"verify.metrics": {"accuracy": {"min": 0.99}}})  # fmt: skip
    assert not gated.passed and gated.failures[0].startswith("accuracy ") and "< min 0.99" in gated.failures[0]
    assert set(gated.report["metrics"]) == {"fp32", "int8"} and gated.recommended.name == "model.fp32.onnx"
    assert gated.report["recipe"]["model"]["name"] == "mobilenet_v3_small"  # the recipe's name, the user's model

    def broken(predict):
        raise ValueError("labels file missing")

    failed = deploy.build(trained, evaluate=broken, out=tmp_path / "b", **common)
    assert not failed.passed and "evaluate raised ValueError on the fp32 model: labels file missing" in failed.failures
    assert (tmp_path / "b" / "report.md").is_file()


def test_bad_inputs_are_one_line(tmp_path, cifar, trained):
    with pytest.raises(DeployError, match=r"calibration item \d+: got shape \(3, 32, 32\) float32, the "
                       r"model takes \(3, 64, 64\)"):  # fmt: skip
        deploy.build(trained, calib=cifar["calib"], input_size=64, out=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(DeployError, match="unknown build option 'int9'"):
        deploy.build(trained, int9=True)

    class Branchy(TinyNet):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else -super().forward(x)  # data-dependent: fx cannot trace

    with pytest.raises(DeployError, match=r"^fold_bn cannot follow Branchy .*set fold_bn.enabled: "
                       "false to skip this stage"):  # fmt: skip
        deploy.build(Branchy(), calib=cifar["calib"], input_size=32, resize=32, out=tmp_path / "b")
    with pytest.raises(DeployError, match=r"^prune cannot follow Branchy .*prune.enabled: false"):
        deploy.build(Branchy(), calib=cifar["calib"], input_size=32, resize=32, prune=0.3, out=tmp_path / "c")


def test_a_python_recipe_through_the_cli(tmp_path, capsys):
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n"
        "def small(width):\n"
        "    return nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))\n"
    )  # fmt: skip
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {name: small, source: python, factory: 'mynets:small', kwargs: {width: 8}, num_classes: 5}\n"
                      "preprocess: {resize: 40, input_size: 32}\nquantize: {calibration: {samples: 16}}\n"
                      "verify: {heldout: 8, latency: {runs: 5}}\n")  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "deploy", "build", str(recipe), "--int8", "--out", "b"],
                         cwd=tmp_path, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    r = json.loads((tmp_path / "b" / "report.json").read_text())
    assert r["fold_bn"]["folded"] == 1 and r["export"]["parity"]["relative"] < 1e-5 and r["int8"]

    recipe.write_text(recipe.read_text().replace("mynets:small", "mynets:large"))
    run = subprocess.run([sys.executable, "-m", "deploy", "build", str(recipe), "--out", "c"], cwd=tmp_path,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        "error: model.factory 'mynets:large' does not import: AttributeError: module 'mynets' has no attribute 'large'")
    assert main(["build", str(recipe), "--out", str(tmp_path / "d")]) == 2  # not importable from this folder
    assert "No module named 'mynets'" in capsys.readouterr().err
