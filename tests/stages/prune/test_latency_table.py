"""NetAdapt's per-layer latency look-up table (stages/prune/table.py): the layers it keys, its file kept across runs
(written whole; a damaged one is left alone and its layers timed again), and its prediction of a pruned model."""

import json

import pytest
import torch
from torch import nn

from deploy import models, recipe
from deploy.recipe import PruneConfig
from deploy.stages.prune.ratio import prune_ratio
from deploy.stages.prune.table import LatencyTable, TableCost, layer_configs, runtime_key

SIZE = 64


def _model():
    torch.manual_seed(0)
    return models.architecture(recipe.load("mobilenet_v3_small").model).eval()


def test_every_conv_and_linear_layer_is_keyed_by_its_configuration_and_input_size():
    model = _model()
    configs = layer_configs(model, SIZE)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(configs) == sorted(layers)
    assert configs["features.0.0"] == ("conv", 3, 16, 3, 3, 2, 2, 1, 1, 1, 1, 1, SIZE, SIZE)  # the stem
    assert configs["features.1.block.0.0"][11:] == (16, SIZE // 2, SIZE // 2)  # depthwise: groups, input size
    assert configs["classifier.3"] == ("linear", 1024, 1000, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1)
    assert model.training is False


def test_the_table_is_kept_across_runs_and_a_damaged_file_is_left_alone(tmp_path, capsys):
    path = tmp_path / "cache" / "table.json"
    model = _model()
    first = LatencyTable(path)
    ms = first.predict(model, SIZE)
    unique = len(set(layer_configs(model, SIZE).values()))
    assert ms > 0 and first.timed == unique and all(v > 0 for v in first.ms.values())
    content = json.loads(path.read_text())
    assert content["schema"] == 1 and list(content["tables"]) == [runtime_key()]
    assert [p.name for p in path.parent.iterdir()] == ["table.json"]  # the temporary file was renamed over it

    again = LatencyTable(path)
    assert again.predict(model, SIZE) == pytest.approx(ms) and again.timed == 0  # nothing timed a second time

    content["tables"]["another runtime"] = {"x": 1.0}
    path.write_text(json.dumps(content))
    added = LatencyTable(path)
    pruned = prune_ratio(model, PruneConfig(ratio=0.5, by="channels", scope="uniform"), SIZE, None)[0]
    added.predict(pruned, SIZE)
    kept = json.loads(path.read_text())["tables"]
    assert kept["another runtime"] == {"x": 1.0} and set(kept[runtime_key()]) > set(content["tables"][runtime_key()])

    path.write_text('{"schema": 1, "tables": {"half')
    damaged = LatencyTable(path)
    assert damaged.ms == {} and "not read" in capsys.readouterr().err
    assert damaged.predict(model, SIZE) > 0 and damaged.timed == unique
    assert path.read_text() == '{"schema": 1, "tables": {"half'  # not ours to replace: left as it was


def test_halving_every_layers_channels_is_predicted_much_faster(tmp_path):
    # at 160 px (0.59 here): at 64 a lone layer's run is ~10 us, much of it ORT's per-call overhead, and the halved
    # model's sum measured 0.65 of the full one's here but 1.04 in one CI run
    model, size = _model(), 160
    table = LatencyTable(None)  # this run only: no file
    pruned = prune_ratio(model, PruneConfig(ratio=0.5, by="channels", scope="uniform"), size, None)[0]
    assert table.predict(pruned, size) < 0.8 * table.predict(model, size)
    assert not list(tmp_path.iterdir())


def test_predictions_are_anchored_at_the_latest_confirmation():
    model = _model()
    cost = TableCost(SIZE, None, sessions=1)
    half = PruneConfig(ratio=0.5, by="channels", scope="uniform")
    pruned = prune_ratio(model, half, SIZE, None)[0]
    base, current, smaller = (cost.load(m) for m in (model, pruned, prune_ratio(pruned, half, SIZE, None)[0]))
    base_ms, current_ms = cost.confirm(base, current, runs=5)
    assert base_ms > current_ms > 0
    assert cost.best_ms([base, current, smaller], 1, 1) == [
        [base_ms], [current_ms], [pytest.approx(smaller.table_ms * current_ms / current.table_ms)]]  # fmt: skip
    assert cost.from_unpruned(smaller) == pytest.approx(smaller.table_ms * base_ms / base.table_ms)
