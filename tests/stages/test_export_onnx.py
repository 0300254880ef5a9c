import numpy as np
import onnx
import torch

from deploy import models, recipe
from deploy.runtimes.ort import OrtCpu
from deploy.stages.export_onnx import INPUT_NAME, OUTPUT_NAME, export
from deploy.stages.fold_bn import fold_batchnorm


def test_export_is_named_dynamic_checked_and_matches_pytorch(tmp_path):
    r = recipe.load("mobilenet_v3_small")
    torch.manual_seed(0)
    model, _ = fold_batchnorm(models.architecture(r.model).eval())
    path = tmp_path / "m.onnx"
    proto = export(model, path, r.export, 224)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = proto.graph.input, proto.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    assert inp.type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    ops = {n.op_type for n in proto.graph.node}
    assert "HardSwish" in ops and "BatchNormalization" not in ops  # h-swish stays one op
    rt = OrtCpu(path)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            ref = model(x).numpy()
        got = rt.infer(x.numpy())
        assert got.shape == (batch, 1000)
        assert np.abs(ref - got).max() / np.abs(ref).max() < 1e-4


def test_dynamo_exporter_gives_the_same_outputs(tmp_path):
    r = recipe.override(recipe.load("squeezenet1_1"), {"export.exporter": "dynamo", "export.opset": 18})
    model = models.architecture(r.model).eval()
    path = tmp_path / "m.onnx"
    export(model, path, r.export, 96)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(OrtCpu(path).infer(x.numpy()) - ref).max() / np.abs(ref).max() < 1e-4
