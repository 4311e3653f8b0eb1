"""Export: models with ABN / InPlaceABN / InPlaceABNSync layers go through torch.export, TorchScript
(script and trace) and ONNX as standard batch_norm + activation ops, and the exported models match
eager. (The layers take that path while scripted, traced or exported: modules.py, forward.)"""

import io

import pytest
import torch
from torch import nn

from inplace_abn import ABN, InPlaceABN, InPlaceABNSync, RecomputeABN, convert_to_abn, disable_recompute, fuse_conv_abn

from test_convert import Bottleneck, TinyResNet, model_and_input


@pytest.fixture(autouse=True)
def _eager_backend(monkeypatch):
    monkeypatch.setenv("INPLACE_ABN_BACKEND", "eager")


def make_model(train_steps=2):
    """Every layer class and activation, affine or not, scaling by ``|w| + eps`` or by BatchNorm's weight
    (RecomputeABN's default: negative and zero weights), running statistics moved by a few steps."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), InPlaceABN(6),
        nn.Conv2d(6, 6, 3), ABN(6, activation="elu", activation_param=0.5),
        nn.Conv2d(6, 6, 1), InPlaceABNSync(6, activation="identity", momentum=None),
        nn.Conv2d(6, 6, 1), ABN(6, activation="relu"),
        nn.Conv2d(6, 6, 1), RecomputeABN(6, activation="relu"),
        nn.Conv2d(6, 4, 1), InPlaceABN(4, affine=False, activation="leaky_relu", activation_param=0.2),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ABN) and module.affine:
                module.weight.normal_(), module.bias.normal_()
        model[9].weight[0] = 0.0
    for _ in range(train_steps):
        model(torch.randn(4, 3, 9, 9)).sum().backward()
    return model.eval()


def exported_ops(graph):
    return {str(node.target) for node in graph.nodes if node.op == "call_function"}


def test_torch_export_lowers_to_batch_norm_and_matches_eager():
    model, x = make_model(), torch.randn(2, 3, 9, 9)
    expected = model(x)
    program = torch.export.export(model, (x,))
    ops = exported_ops(program.graph)
    assert "aten.batch_norm.default" in ops and "aten.leaky_relu.default" in ops and "aten.elu.default" in ops
    assert not any("InPlaceABN" in op or "autograd" in op for op in ops)
    torch.testing.assert_close(program.module()(x), expected)
    other = torch.randn(3, 3, 11, 11)  # the graph holds no shape of the example input
    torch.testing.assert_close(torch.export.export(model, (other,)).module()(other), model(other))


def test_torchscript_script_matches_eager_and_round_trips():
    model, x = make_model(), torch.randn(2, 3, 9, 9)
    scripted = torch.jit.script(model)
    torch.testing.assert_close(scripted(x), model(x))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.jit.load(buffer)(x), model(x))
    layer_graph = str(getattr(scripted, "1").inlined_graph)
    assert "aten::batch_norm" in layer_graph and "InPlaceABNFunction" not in layer_graph
    assert isinstance(model[1], InPlaceABN)  # scripting leaves the eager model as it was


def test_scripted_layers_train_like_eager_ones():
    """In training mode the scripted layer computes the same outputs, gradients and running statistics
    (momentum and the cumulative average alike), out of place."""
    eager, scripted_source = make_model(0).train(), make_model(0).train()
    scripted = torch.jit.script(scripted_source)
    for _ in range(2):
        x = torch.randn(4, 3, 9, 9)
        x_eager, x_scripted = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_eager, out_scripted = eager(x_eager), scripted(x_scripted)
        torch.testing.assert_close(out_scripted, out_eager, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(out_eager)
        out_eager.backward(grad), out_scripted.backward(grad)
        torch.testing.assert_close(x_scripted.grad, x_eager.grad, atol=1e-4, rtol=1e-4)
    for name, buffer in eager.state_dict().items():
        torch.testing.assert_close(scripted.state_dict()[name], buffer, atol=1e-5, rtol=1e-5, msg=name)


def test_torchscript_trace_matches_eager():
    model, x = make_model(), torch.randn(2, 3, 9, 9)
    traced = torch.jit.trace(model, (x,))
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" in graph and "PythonOp" not in graph
    other = torch.randn(3, 3, 9, 9)
    torch.testing.assert_close(traced(other), model(other))


@pytest.mark.parametrize("dynamo,opset", [(False, 17), (True, 18)])
def test_onnx_export_runs_in_onnxruntime(tmp_path, dynamo, opset):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")  # the torch.export-based exporter writes through it
    model, x = make_model(), torch.randn(2, 3, 9, 9)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), opset_version=opset, dynamo=dynamo, input_names=["x"])
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    op_types = {node.op_type for node in proto.graph.node}
    assert {"LeakyRelu", "Elu", "Relu"} <= op_types
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)  # standard operators only
    if not dynamo:  # the dynamo exporter also folds BatchNormalization into the convolutions
        assert "BatchNormalization" in op_types
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(output), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", [lambda inplace: nn.LeakyReLU(0.1, inplace=inplace), nn.ReLU],
                         ids=["leaky_relu", "relu"])
def test_converted_and_fused_resnet_export(act):
    """A torchvision-style model after convert_to_abn (an fx.GraphModule) scripts, traces and exports;
    so does the same model with the layers folded into its convolutions. With ReLU, the recompute-mode
    layers scale by BatchNorm's weight, in the exported graphs and the folded convolutions too."""
    model, x = model_and_input(TinyResNet(Bottleneck, act=act))
    converted, report = convert_to_abn(model)
    converted.eval()
    modes = {layer.mode for layer in report.layers}
    assert modes == ({"in place"} if act is not nn.ReLU else {"in place", "recompute"})  # relu: all but projections
    # Training-mode hooks that the recompute layers need (TorchScript cannot compile them): not for export.
    disable_recompute(converted)
    expected = converted(x)
    torch.testing.assert_close(torch.jit.script(converted)(x), expected)
    torch.testing.assert_close(torch.jit.trace(converted, (x,))(x), expected)
    torch.testing.assert_close(torch.export.export(converted, (x,)).module()(x), expected)
    fused = fuse_conv_abn(converted)
    torch.testing.assert_close(torch.export.export(fused, (x,)).module()(x), expected)
