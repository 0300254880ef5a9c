"""`deploy view`: netron serves the graph on 127.0.0.1 without a browser, and stops."""

import re
import urllib.request

import pytest
import torch

from deploy import view
from deploy.cli import main
from deploy.errors import DeployError


def test_view_serves_the_model_on_localhost_and_stops(tmp_path):
    path = tmp_path / "model.fp32.onnx"
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.zeros(1, 3, 8, 8),), str(path), dynamo=False)
    url = view.start(view.resolve(tmp_path), "127.0.0.1", 0, browse=False)
    assert url.startswith("http://127.0.0.1:")
    try:
        with urllib.request.urlopen(url, timeout=10) as page:
            html = page.read().decode()
        model_url = re.search(r'<meta name="file" content="([^"]+)">', html)[1]  # where netron's page loads it from
        with urllib.request.urlopen(url + model_url, timeout=10) as served:
            assert served.read() == path.read_bytes()  # the model file itself is what netron serves
    finally:
        view.stop(url)
    with pytest.raises(OSError):  # refused or reset: nothing serves there any more
        urllib.request.urlopen(url, timeout=2)


def test_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["view", str(tmp_path / "nope.onnx"), "--no-browser"]) == 2
    assert "model file not found" in capsys.readouterr().err
    with pytest.raises(DeployError, match="with an int8 model"):
        view.resolve(tmp_path, int8=True)
