"""Models with the layer leave PyTorch: torch.export with its decomposition into core ATen ops,
ONNX (run in onnxruntime) and Core ML (converted here; run on macOS)."""

import sys

import pytest
import torch

import torch_spatialnorm as sn
from torch_spatialnorm import reference
from helpers import random_image

WINDOWS = [(3, 3), (4, 4), (5, 2)]  # odd, even, rectangular
DECOMPOSITION_OPS = {"constant_pad_nd", "avg_pool2d", "pow", "where", "mul"}


def small_model(window, alpha=1.0, beta=0.75):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), sn.SpatialNormalization(*window, alpha=alpha, beta=beta, delta=1.0)
    ).eval()


def function_targets(graph):
    return [node.target for node in graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_export_decomposes_into_core_aten_ops(window, alpha, generator):
    model = small_model(window, alpha)
    x = random_image((2, 3, 17, 14), 2.0, generator, torch.float32)
    exported = torch.export.export(model, (x,))
    assert torch.ops.spatialnorm.forward_composite.default in function_targets(exported.graph)
    decomposed = exported.run_decompositions()
    targets = function_targets(decomposed.graph)
    assert all(t.namespace == "aten" for t in targets), targets
    if alpha:
        assert DECOMPOSITION_OPS <= {t._opname for t in targets}
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_decomposition_holds_on_spikes_tiny_delta_and_nan(generator):
    """Against the float64 reference, on data within float32's range that breaks careless sums:
    a spike of 1e15 beside values near 1, a delta of 1e-30 over windows of zeros, NaN and inf."""
    x = random_image((1, 2, 12, 11), 1.0, generator)
    x[0, 0, 5, 5] = 1e15
    x[0, 1, :4, :4] = 0.0
    x[0, 1, 8, 2] = float("nan")
    x[0, 1, 10, 9] = float("inf")
    layer = sn.SpatialNormalization(3, 4, alpha=1.0, beta=0.75, delta=1e-30)
    decomposed = torch.export.export(layer, (x.float(),)).run_decompositions()
    out = decomposed.module()(x.float()).double()
    expected = reference.spatial_normalization(x.float().double(), 3, 4, 1.0, 0.75, 1e-30)
    assert torch.equal(out.isnan(), expected.isnan())
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(out, layer(x.float()).double(), rtol=1e-5, atol=1e-6, equal_nan=True)


def test_export_keeps_16_bit_math_in_float32(generator):
    layer = sn.SpatialNormalization(5, alpha=2.0, beta=0.75)
    x = random_image((1, 2, 9, 8), 2.0, generator, torch.float32).to(torch.bfloat16)
    decomposed = torch.export.export(layer, (x,)).run_decompositions()
    out = decomposed.module()(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, layer(x), rtol=1e-2, atol=1e-3)


def test_eager_and_compile_keep_the_kernel(generator):
    model = small_model((3, 3))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    x = random_image((1, 3, 10, 10), 1.0, generator, torch.float32)
    torch.compile(model, backend=backend)(x)
    assert torch.ops.spatialnorm.forward.default in function_targets(graphs[0].graph)


@pytest.mark.parametrize("window", WINDOWS)
def test_onnx_export_runs_in_onnxruntime(window, generator, tmp_path):
    import onnxruntime
    model = small_model(window)
    x = random_image((2, 3, 17, 14), 2.0, generator, torch.float32)
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    path = tmp_path / "model.onnx"
    program.save(str(path))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert {"Pad", "AveragePool", "Pow"} <= {node.op_type for node in program.model_proto.graph.node}
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(x), rtol=1e-5, atol=1e-6)


def coreml_model(model, x):
    import coremltools
    program = torch.export.export(model, (x,)).run_decompositions()
    return coremltools.convert(
        program, convert_to="mlprogram", compute_precision=coremltools.precision.FLOAT32,
        minimum_deployment_target=coremltools.target.macOS15,
    )


def test_coreml_conversion_holds_the_decomposition(generator):
    model = small_model((4, 3))
    converted = coreml_model(model, random_image((1, 3, 12, 11), 1.0, generator, torch.float32))
    ops = [op.op_type for op in converted._mil_program.functions["main"].operations if op.op_type != "const"]
    layer_ops = ops[ops.index("conv") + 1 :]
    assert layer_ops == ["mul", "pad", "avg_pool", "add", "less_equal", "pow", "select", "mul"]


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML runs converted models only on macOS")
def test_coreml_prediction_matches(generator):
    model = small_model((5, 2))
    x = random_image((1, 3, 12, 11), 1.0, generator, torch.float32)
    converted = coreml_model(model, x)
    (name,) = [i.name for i in converted.get_spec().description.input]
    (output,) = converted.predict({name: x.numpy()}).values()
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(output), model(x), rtol=1e-4, atol=1e-5)
