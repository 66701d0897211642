import pytest
import torch

from qlora_fast import dequantize_nf4
from qlora_fast.testing import make_nf4_linear
from tests.helpers import reference_dequantize


@pytest.mark.parametrize("nested", [True, False])
def test_public_dequantize_matches_reference(nested):
    layer = make_nf4_linear(70, 130, torch.bfloat16, nested)
    assert torch.equal(dequantize_nf4(layer.weight), reference_dequantize(layer.weight))
    assert torch.equal(dequantize_nf4(layer.weight.data, layer.weight.quant_state),
                       reference_dequantize(layer.weight))


def test_custom_op_passes_opcheck():
    w = make_nf4_linear(64, 128, torch.float16, True).weight
    s = w.quant_state
    args = (w.data.view(torch.uint8).reshape(-1), s.absmax, s.code, s.state2.absmax, s.state2.code, s.offset,
            s.blocksize, s.state2.blocksize, [64, 128], torch.float16)
    torch.library.opcheck(torch.ops.qlora_fast.dequantize_nf4.default, args,
                          test_utils=("test_schema", "test_faketensor"))


def test_fp4_is_refused_with_a_clear_error():
    layer = make_nf4_linear(64, 128, torch.float16, True, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type fp4"):
        dequantize_nf4(layer.weight)


def test_dequantize_traces_in_torch_compile_without_graph_breaks():
    layer = make_nf4_linear(64, 128, torch.bfloat16, True)
    compiled = torch.compile(lambda: dequantize_nf4(layer.weight) * 2, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(), reference_dequantize(layer.weight) * 2)


@pytest.mark.parametrize("blocksize", [64, 128])
def test_public_dequantize_takes_the_module_and_follows_the_state_dtype(blocksize):
    """The seed harness's call: dequantize_fx(linear4bit), after setting quant_state.dtype on it."""
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(130, 70, bias=False, compute_dtype=torch.float16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(70, 130) * 0.02, requires_grad=False, quant_type="nf4",
                                     blocksize=blocksize)
    layer.weight.quant_state  # noqa: B018  (quantized on first use of .to / cuda; make sure it is)
    layer = layer.to("cpu")
    assert dequantize_nf4(layer).dtype == torch.float32
    assert dequantize_nf4(layer).dtype == torch.float32  # the cached view, second call
    layer.weight.quant_state.dtype = torch.float16
    out = dequantize_nf4(layer)
    assert out.dtype == torch.float16 and torch.equal(out, reference_dequantize(layer.weight))
