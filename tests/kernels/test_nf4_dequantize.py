import bitsandbytes as bnb
import bitsandbytes.functional as F
import pytest
import torch

from qlora_fast.kernels import _utils
from qlora_fast.kernels import nf4_dequantize as nf4_dequantize_module
from qlora_fast.kernels.nf4_dequantize import CANDIDATE_META, new_output, nf4_dequantize, nf4_dequantize_stacked
from qlora_fast.nf4 import nf4_weight_from_bnb
from tests.helpers import reference_dequantize
from tests.kernels.test_utils import RecordingCompiled

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def quantized(shape, dtype, nested, blocksize=64, quant_storage=torch.uint8):
    weight = torch.randn(*shape, dtype=dtype) * 0.05
    return bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=nested,
                             blocksize=blocksize, quant_storage=quant_storage).to("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (128, 192), (70, 130), (33, 67), (1, 1), (3, 5), (257, 64)])
def test_bit_exact_with_reference_decode(shape, dtype, nested):
    p = quantized(shape, dtype, nested)
    out = nf4_dequantize(nf4_weight_from_bnb(p))
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, reference_dequantize(p))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(64, 128), (96, 320), (200, 64)])
def test_bit_exact_with_bitsandbytes(shape, dtype, nested):
    # bitsandbytes' CPU kernel is exact where rows hold whole blocks (the GPU run checks odd shapes).
    p = quantized(shape, dtype, nested)
    assert torch.equal(nf4_dequantize(nf4_weight_from_bnb(p)), F.dequantize_4bit(p.data, p.quant_state))


@pytest.mark.parametrize("meta", CANDIDATE_META[1:], ids=str)
@pytest.mark.parametrize("stacked", [False, True])
def test_every_launch_candidate_is_bit_exact(meta, stacked):
    """The candidates bench/seed_dequant.py times (streaming cache hints among them) decode as the default."""
    p = quantized((70, 130), torch.float16, True)
    w = nf4_weight_from_bnb(p)
    out = nf4_dequantize_stacked([w, w], torch.float16, meta=meta)[70:] if stacked else nf4_dequantize(w, meta=meta)
    assert torch.equal(out, reference_dequantize(p))


@pytest.mark.parametrize("blocksize", [32, 128, 256])
def test_other_blocksizes(blocksize):
    p = quantized((48, 100), torch.bfloat16, True, blocksize=blocksize)
    assert torch.equal(nf4_dequantize(nf4_weight_from_bnb(p)), reference_dequantize(p))


def test_quant_storage_bf16_as_fsdp_qlora_stores_it():
    p = quantized((64, 128), torch.bfloat16, True, quant_storage=torch.bfloat16)
    assert p.data.dtype == torch.bfloat16
    assert torch.equal(nf4_dequantize(nf4_weight_from_bnb(p)), reference_dequantize(p))


def test_out_buffer_fully_written_and_dtype_override():
    p = quantized((70, 130), torch.bfloat16, True)
    out = torch.full((70, 130), float("nan"), dtype=torch.float16)
    nf4_dequantize(nf4_weight_from_bnb(p), torch.float16, out=out)
    assert torch.equal(out, reference_dequantize(p, torch.float16))


def test_out_buffer_of_wrong_shape_is_refused():
    p = quantized((8, 64), torch.float16, False)
    with pytest.raises(ValueError, match="contiguous rows"):
        nf4_dequantize(nf4_weight_from_bnb(p), out=torch.empty(64, 8, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("leading", [True, False])
def test_into_columns_of_a_wider_matrix(dtype, nested, leading):
    """The weight written into the leading or trailing columns of a wider matrix: those columns exact,
    the others untouched, also on the relaunch (the first launch's row stride kept)."""
    p = quantized((70, 128), dtype, nested)
    w = nf4_weight_from_bnb(p)
    for _ in range(2):
        wide = torch.full((70, 128 + 24), 7.0, dtype=dtype)
        columns = wide[:, :128] if leading else wide[:, 24:]
        nf4_dequantize(w, out=columns)
        assert torch.equal(columns, reference_dequantize(p))
        assert (wide[:, 128:] if leading else wide[:, :24]).eq(7.0).all()
    assert torch.equal(nf4_dequantize(w), reference_dequantize(p))  # the contiguous launch apart


def test_strided_rows_must_hold_whole_blocks():
    p = quantized((8, 96), torch.float16, False)
    with pytest.raises(ValueError, match="multiple of the blocksize 64"):
        nf4_dequantize(nf4_weight_from_bnb(p), out=torch.empty(8, 128, dtype=torch.float16)[:, :96])


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (96, 520)])
def test_new_output_is_a_fresh_contiguous_tensor(shape):
    """Outputs made from a weight's stride-0 template: contiguous, their own memory, one template a dtype."""
    templates = {}
    first = new_output(templates, shape, torch.bfloat16, torch.device("cpu"))
    second = new_output(templates, shape, torch.bfloat16, torch.device("cpu"))
    assert first.shape == shape and first.dtype == torch.bfloat16 and first.is_contiguous()
    assert first.stride() == torch.empty(shape).stride()
    first.fill_(1.0)
    second.fill_(2.0)
    assert first.eq(1.0).all() and templates[torch.bfloat16].untyped_storage().nbytes() == 2
    assert first.data_ptr() != second.data_ptr() != templates[torch.bfloat16].data_ptr()
    assert new_output(templates, shape, torch.float16, torch.device("cpu")).dtype == torch.float16
    assert len(templates) == 2


def test_each_call_returns_a_new_tensor():
    weight = nf4_weight_from_bnb(quantized((8, 64), torch.float16, True))
    first, second = nf4_dequantize(weight), nf4_dequantize(weight)
    assert first.equal(second) and first.data_ptr() != second.data_ptr() and first.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("nested", [True, False])
def test_stacked_weights_in_one_launch_bit_exact(dtype, nested):
    """q, k and v of unequal heights (one of them not a whole number of programs) under one another."""
    params = [quantized((rows, 128), dtype, nested) for rows in (96, 40, 520)]
    weights = [nf4_weight_from_bnb(p) for p in params]
    stacked = nf4_dequantize_stacked(weights, dtype)
    assert stacked.shape == (656, 128) and stacked.dtype == dtype
    assert torch.equal(stacked, torch.cat([reference_dequantize(p) for p in params]))
    assert nf4_dequantize_stacked(weights, dtype).equal(stacked)  # again, from the cached table


def test_stacked_table_follows_the_weights():
    params = [quantized((64, 64), torch.bfloat16, True) for _ in range(2)]
    first = [nf4_weight_from_bnb(p) for p in params]
    nf4_dequantize_stacked(first, torch.bfloat16)
    other = [nf4_weight_from_bnb(quantized((64, 64), torch.bfloat16, True)), first[1]]
    assert nf4_dequantize_stacked(other, torch.bfloat16)[:64].equal(nf4_dequantize(other[0]))


@pytest.mark.parametrize("stacked", [False, True])
def test_later_calls_relaunch_the_first_launch(monkeypatch, stacked):
    """After a weight's first launch per dtype, calls go to its Relaunch, not through Triton's launch."""
    monkeypatch.setattr(_utils, "INTERPRETING", False)
    monkeypatch.setattr(_utils, "current_device", lambda: 0)
    name = "_nf4_dequantize_stacked_kernel" if stacked else "_nf4_dequantize_kernel"
    kernel, compiled, launches = getattr(nf4_dequantize_module, name), RecordingCompiled(), []

    class Launching:  # the interpreter's launch, returning a compiled kernel as a GPU launch does
        def __getitem__(self, grid):
            return lambda *args, **options: (launches.append(grid), kernel[grid](*args, **options), compiled)[2]

    monkeypatch.setattr(nf4_dequantize_module, name, Launching())
    weight = nf4_weight_from_bnb(quantized((64, 64), torch.bfloat16, True))
    dequantize = (lambda dtype: nf4_dequantize_stacked([weight], dtype)) if stacked else (
        lambda dtype: nf4_dequantize(weight, dtype))
    first = dequantize(torch.bfloat16)
    second = dequantize(torch.bfloat16)
    assert len(launches) == 1 and len(compiled.calls) == 1
    assert compiled.calls[0][1][6 if not stacked else 1] == second.data_ptr() != first.data_ptr()
    dequantize(torch.float16)  # another dtype: its own first launch
    assert len(launches) == 2


def test_stacked_weights_must_agree():
    a, b = quantized((64, 128), torch.bfloat16, True), quantized((64, 64), torch.bfloat16, True)
    with pytest.raises(ValueError, match="differ"):
        nf4_dequantize_stacked([nf4_weight_from_bnb(a), nf4_weight_from_bnb(b)], torch.bfloat16)
