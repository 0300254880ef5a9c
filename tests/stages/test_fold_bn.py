import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from deploy import models, recipe
from deploy.stages.fold_bn import fold_batchnorm, max_logit_difference


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial statistics so that folding has something to get wrong."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize("name", recipe.available())
def test_folding_is_exact_on_every_registered_model(name):
    model = models.architecture(recipe.load(name).model).eval()
    _randomize_bn(model)
    n_bn = sum(isinstance(m, _BatchNorm) for m in model.modules())
    folded, names = fold_batchnorm(model)
    assert type(folded) is type(model)  # a plain module of the same class, not a GraphModule
    assert len(names) == n_bn
    assert not any(isinstance(m, _BatchNorm) for m in folded.modules())
    _, rel = max_logit_difference(model, folded, torch.randn(2, 3, 160, 160))
    assert rel < 1e-5


def test_linear_bn_and_bn_with_shared_input_are_handled():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.bn_branch = nn.BatchNorm2d(8)  # conv output also used elsewhere: cannot fold
            self.fc = nn.Linear(8, 4)
            self.bn1d = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.conv(x)
            z = self.bn(y) + self.bn_branch(y)
            return self.bn1d(self.fc(z.mean((2, 3))))

    net = Net().eval()
    _randomize_bn(net)
    folded, names = fold_batchnorm(net)
    assert names == ["bn1d"]
    _, rel = max_logit_difference(net, folded, torch.randn(4, 3, 16, 16))
    assert rel < 1e-5


def test_folded_model_saves_and_reloads(tmp_path):
    model = models.architecture(recipe.load("efficientnet_lite0").model).eval()
    folded, _ = fold_batchnorm(model)
    torch.save(folded.state_dict(), tmp_path / "f.pth")
    again, _ = fold_batchnorm(models.architecture(recipe.load("efficientnet_lite0").model).eval())
    again.load_state_dict(torch.load(tmp_path / "f.pth", weights_only=True))
    x = torch.randn(1, 3, 96, 96)
    assert torch.equal(folded(x), again(x))
