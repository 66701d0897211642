import pytest
import torch

from qlora_fast.kernels.low_rank import LowRank
from qlora_fast.kernels.low_rank_add import low_rank_add_
from qlora_fast.kernels.swiglu import (SWIGLU_BACKWARD_META, _blocks_for_rank, _forward_meta, sums_in_kernel,
                                      swiglu_backward_, swiglu_backward_writing_h_, swiglu_forward)
from tests.helpers import rel_err, same_up_to_fp32_sum_order


TORCH_ACTIVATIONS = {"silu": torch.nn.functional.silu,
                     "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh")}


def zero_terms(rows, cols, dtype):
    """(dh, gate, up) terms that add exact zeros (B = 0), for the backward of the plain activation; their
    xa gives the LoRA sums something to multiply."""
    return [LowRank(torch.randn(rows, 1).to(dtype), torch.zeros(cols, 1, dtype=dtype), 1.0) for _ in range(3)]


def plain_backward(dh, g, u, activation="silu"):
    """swiglu_backward_ with no LoRA terms: (dg, du) and the h^T @ xa sum, on copies."""
    rows, cols = dh.numel() // dh.shape[-1], dh.shape[-1]
    terms = zero_terms(rows, cols, dh.dtype)
    dg, du, (_, _, down_sum) = swiglu_backward_(dh.clone(), g.clone(), u.clone(), *terms, activation=activation)
    return dg, du, down_sum, terms[0].xa


def assert_h_sum(down_sum, h, xa):
    """down_sum is h^T @ xa of the h forward writes (float64 reference, fp32 summation order aside)."""
    expected = h.reshape(-1, h.shape[-1]).double().t() @ xa.double()
    assert rel_err(down_sum, expected) < 1e-6


def torch_swiglu(g, u, dh, activation="silu"):
    """What the stock MLP computes: act_fn(gate) * up, and its autograd gradients."""
    g = g.clone().requires_grad_(True)
    u = u.clone().requires_grad_(True)
    h = TORCH_ACTIVATIONS[activation](g) * u
    h.backward(dh)
    return h.detach(), g.grad, u.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# not multiples of the block (1024 elements on the GPU, 2^16 in the interpreter), one crossing it
@pytest.mark.parametrize("shape", [(3, 5, 37), (1, 2500), (2, 33000)])
def test_matches_torch(dtype, shape):
    g = (torch.randn(shape) * 3).to(dtype)
    u = torch.randn(shape).to(dtype)
    dh = torch.randn(shape).to(dtype)
    h_ref, dg_ref, du_ref = torch_swiglu(g, u, dh)

    h = swiglu_forward(g, u)
    # The same fp32 formula rounded at the same points as torch on the GPU (bench/kernel_timings.py checks it
    # bit for bit in bf16 there); torch's CPU fp16 silu rounds a few elements differently: two fp16 ulps allowed
    # (one on silu(g), carried into the product).
    two_ulps = {torch.float16: dict(rtol=2**-9, atol=2**-24)}.get(dtype, {})
    torch.testing.assert_close(h, h_ref, **two_ulps)

    dg, du, down_sum, xa = plain_backward(dh, g, u)
    assert_h_sum(down_sum, h, xa)  # backward recomputes forward's h
    # dg's fp32 formula differs from torch's silu_backward in the last bit before rounding
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(dg, dg_ref) < tolerance
    assert rel_err(du, du_ref) < tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (2, 33000)])
def test_gelu_tanh_matches_torch(dtype, shape):
    """GeGLU (Gemma's gelu_pytorch_tanh) against torch's gelu(approximate="tanh") * u and its autograd
    gradients; g spread over both tails, where tanh saturates."""
    g = (torch.randn(shape) * 4).to(dtype)
    u, dh = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    h_ref, dg_ref, du_ref = torch_swiglu(g, u, dh, "gelu_tanh")
    h = swiglu_forward(g, u, activation="gelu_tanh")
    # tanh spelled with exp: a last-bit difference before rounding can flip a rounding (one ulp of act(g))
    one_ulp = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2**-9, atol=2**-14),
               torch.bfloat16: dict(rtol=2**-6, atol=2**-10)}[dtype]
    torch.testing.assert_close(h, h_ref, **one_ulp)
    dg, du, down_sum, xa = plain_backward(dh, g, u, "gelu_tanh")
    assert_h_sum(down_sum, h, xa)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(dg, dg_ref) < tolerance
    assert rel_err(du, du_ref) < tolerance
    # SiLU's results fail the same checks: the activation switch reaches both kernels
    assert not torch.allclose(swiglu_forward(g, u), h_ref, **one_ulp)
    assert rel_err(plain_backward(dh, g, u)[0], dg_ref) > tolerance


def test_rejects_unknown_activations():
    with pytest.raises(ValueError, match="activation 'relu'"):
        swiglu_forward(torch.randn(4, 8), torch.randn(4, 8), activation="relu")


def test_backward_overwrites_g_and_u_bumps_their_version_and_leaves_dh():
    g, u, dh = torch.randn(3, 40), torch.randn(3, 40), torch.randn(3, 40)
    dh_before, versions = dh.clone(), [t._version for t in (dh, g, u)]
    dg, du, _ = swiglu_backward_(dh, g, u, *zero_terms(3, 40, dh.dtype))
    assert dg is g and du is u and torch.equal(dh, dh_before)
    assert [t._version for t in (dh, g, u)] == [versions[0], versions[1] + 1, versions[2] + 1]


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu_forward(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float16))


def _low_rank(rows, cols, rank, dtype, scale, b_transposed=False):
    xa = torch.randn(rows, rank).to(dtype)
    # the down projection's term in backward is dy_b @ A: b = A^T, a column-major view
    b = torch.randn(rank, cols).to(dtype).t() if b_transposed else torch.randn(cols, rank).to(dtype)
    return LowRank(xa, b, scale)


def _with_term(base, term):
    """base + s * xa @ b^T as cuBLAS' addmm_ computes it: an fp32 sum, rounded once to base's dtype."""
    return (base.double() + term.scale * (term.xa.double() @ term.b.double().t())).to(base.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [16, 8, 5])
def test_forward_adds_the_lora_terms(dtype, rank):
    rows, cols = 37, 1337  # neither a multiple of the tiles
    g, u = (torch.randn(rows, cols) * 3).to(dtype), torch.randn(rows, cols).to(dtype)
    gate_term, up_term = _low_rank(rows, cols, rank, dtype, 0.5), _low_rank(rows, cols, rank, dtype, 2.0)
    h_ref, _, _ = torch_swiglu(_with_term(g, gate_term), _with_term(u, up_term), torch.zeros_like(g))

    g_in, u_in = g.clone(), u.clone()
    h = swiglu_forward(g_in, u_in, gate_term, up_term)
    assert rel_err(h, h_ref) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(g_in, g) and torch.equal(u_in, u)
    # each sum is rounded once, as the in-place term kernel rounds it
    g_full, u_full = low_rank_add_(g.clone(), gate_term), low_rank_add_(u.clone(), up_term)
    assert torch.equal(h, swiglu_forward(g_full, u_full))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(70, 300), (37, 1337)])
def test_backward_adds_the_lora_terms(dtype, shape):
    """dh's term, and gate's and up's as forward added them: bit for bit the plain activation on the sums."""
    (rows, cols), rank = shape, 16
    g, u, dh = (torch.randn(rows, cols) * 3).to(dtype), torch.randn(rows, cols).to(dtype), torch.randn(rows, cols).to(dtype)
    dh_term = _low_rank(rows, cols, rank, dtype, 1.5, b_transposed=True)
    gate_term, up_term = _low_rank(rows, cols, rank, dtype, 0.5), _low_rank(rows, cols, rank, dtype, 2.0)
    g_full, u_full = low_rank_add_(g.clone(), gate_term), low_rank_add_(u.clone(), up_term)
    dg_ref, du_ref, _, _ = plain_backward(low_rank_add_(dh.clone(), dh_term), g_full, u_full)

    dg, du, (_, _, down_sum) = swiglu_backward_(dh.clone(), g.clone(), u.clone(), dh_term, gate_term, up_term)
    assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)
    assert_h_sum(down_sum, swiglu_forward(g, u, gate_term, up_term), dh_term.xa)
    h_64, dg_64, du_64 = torch_swiglu(g_full, u_full, _with_term(dh, dh_term))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(dg, dg_64) < tolerance and rel_err(du, du_64) < tolerance


def test_rejects_a_term_of_the_wrong_shape():
    g, u = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="LoRA term"):
        swiglu_forward(g, u, LowRank(torch.randn(4, 2), torch.randn(7, 2), 1.0))


def _terms(rows, cols, rank, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s).to(dtype)
    return [LowRank(make(rows, rank), make(cols, rank, s=0.1), scale) for scale in (0.5, 2.0, 0.25)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows, cols, rank", [(70, 48, 8), (33, 130, 16), (5, 20, 3)])
@pytest.mark.parametrize("wide, activation", [(False, "silu"), (True, "silu"), (False, "gelu_tanh")])
def test_backward_sums_are_the_products_of_what_it_writes(dtype, rows, cols, rank, wide, activation):
    """The three sums equal float64 products of the dg and du it writes and of forward's h (the GEMMs the
    fused sums replace), up to fp32 summation order; h's sum is not dg's."""
    g, u, dh = ((torch.randn(rows, cols) * s).to(dtype) for s in (3, 1, 1))
    dh_term, gate_term, up_term = _terms(rows, cols, rank, dtype)
    options = dict(wide=wide, activation=activation)
    h = swiglu_forward(g, u, gate_term, up_term, **options)
    dg, du, (gate_sum, up_sum, down_sum) = swiglu_backward_(dh.clone(), g.clone(), u.clone(), dh_term,
                                                            gate_term, up_term, **options)
    for got, left, term in ((gate_sum, dg, gate_term), (up_sum, du, up_term), (down_sum, h, dh_term)):
        expected = left.double().t() @ term.xa.double()
        assert got.shape == (cols, rank) and got.dtype == torch.float32
        assert rel_err(got, expected) < 1e-6
    assert rel_err(down_sum, dg.double().t() @ dh_term.xa.double()) > 1e-2


# rank 40 (R = 64) takes tiles narrowed to stay in registers: 16 x 32 where the launch asks 32 x 64
@pytest.mark.parametrize("rank, meta", [(4, {"BLOCK_M": 16, "BLOCK_N": 16, "ROW_CHUNKS": 4, "num_warps": 4}),
                                        (40, {"BLOCK_M": 32, "BLOCK_N": 64, "ROW_CHUNKS": 3, "num_warps": 8})])
def test_backward_sums_every_row_chunk(monkeypatch, rank, meta):
    """Rows split over several chunks (as on the GPU) give the one-chunk sums: a chunk left out fails."""
    from qlora_fast.kernels import swiglu as swiglu_module
    rows, cols, dtype = 150, 72, torch.float32
    g, u, dh = ((torch.randn(rows, cols) * s).to(dtype) for s in (3, 1, 1))
    terms = _terms(rows, cols, rank, dtype)
    dg_ref, du_ref, one_chunk = swiglu_backward_(dh.clone(), g.clone(), u.clone(), *terms)
    monkeypatch.setattr(swiglu_module, "INTERPRETING", False)  # the GPU's chunking, run by the interpreter
    dg, du, chunked = swiglu_backward_(dh.clone(), g.clone(), u.clone(), *terms, meta=meta)
    assert same_up_to_fp32_sum_order(dg, dg_ref) and same_up_to_fp32_sum_order(du, du_ref)
    for a, b in zip(one_chunk, chunked):
        assert rel_err(b, a.double()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank, wide, activation", [(40, False, "silu"), (72, True, "silu"), (40, False, "gelu_tanh")])
def test_backward_writing_h_gives_what_the_summing_one_writes(dtype, rank, wide, activation):
    """Above rank 32 the kernel writes h over dh and leaves the sums to GEMMs: the same dg and du, bit for
    bit, as the summing launch, and forward's h; the GEMMs of them give the summing launch's sums."""
    rows, cols = 70, 130
    g, u, dh = ((torch.randn(rows, cols) * s).to(dtype) for s in (3, 1, 1))
    terms = _terms(rows, cols, rank, dtype)
    options = dict(wide=wide, activation=activation)
    dg_ref, du_ref, sums = swiglu_backward_(dh.clone(), g.clone(), u.clone(), *terms, **options)
    dh_buffer = dh.clone()
    dg, du, h = swiglu_backward_writing_h_(dh_buffer, g.clone(), u.clone(), *terms, **options)
    assert h.data_ptr() == dh_buffer.data_ptr()  # no new (tokens x intermediate) buffer
    assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)
    assert torch.equal(h, swiglu_forward(g, u, terms[1], terms[2], **options))
    for got, left, term in zip(sums, (dg, du, h), (terms[1], terms[2], terms[0])):
        assert rel_err(got, left.double().t() @ term.xa.double()) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_backward_writing_h_without_terms_is_the_plain_backward(dtype, activation):
    """With no terms (the GEMMs carried them) the h-writing launch gives the summing launch's dg and du
    with zero terms, bit for bit, and forward's h."""
    g, u, dh = ((torch.randn(70, 130) * s).to(dtype) for s in (3, 1, 1))
    dg_ref, du_ref, _ = swiglu_backward_(dh.clone(), g.clone(), u.clone(), *zero_terms(70, 130, dtype),
                                         activation=activation)
    dg, du, h = swiglu_backward_writing_h_(dh.clone(), g.clone(), u.clone(), activation=activation)
    assert torch.equal(dg, dg_ref) and torch.equal(du, du_ref)
    assert torch.equal(h, swiglu_forward(g, u, activation=activation))


def test_backward_terms_go_together():
    g = torch.randn(8, 16)
    term = zero_terms(8, 16, torch.float32)[0]
    with pytest.raises(ValueError, match="go together"):
        swiglu_backward_writing_h_(g.clone(), g.clone(), g.clone(), term)
    with pytest.raises(ValueError, match="summing launch needs them"):
        swiglu_backward_(g.clone(), g.clone(), g.clone(), None, None, None)


@pytest.mark.parametrize("rank, in_kernel", [(16, True), (32, True), (33, False), (128, False)])
def test_sums_stay_in_the_kernel_up_to_rank_32(rank, in_kernel):
    """H100, 8192 x 14336: the in-kernel sums take 0.51 ms at r=16 but 1.72 at r=64 and 5.04 at r=128,
    against 0.26 ms for the GEMMs (kernels/swiglu.py)."""
    assert sums_in_kernel(*_terms(8, 16, rank, torch.float32)) is in_kernel


@pytest.mark.parametrize("rank, sums, blocks", [(16, True, (32, 64)), (32, True, (32, 64)), (64, False, (32, 64)),
                                                (128, False, (16, 32))])
def test_backward_tiles_by_rank(rank, sums, blocks):
    """The backward's tiles on the GPU (kernels/swiglu.py: the budgets that keep sm_90 from spilling, and the
    taller tiles measured faster above rank 32)."""
    assert _blocks_for_rank(SWIGLU_BACKWARD_META["BLOCK_M"], SWIGLU_BACKWARD_META["BLOCK_N"], rank, sums) == blocks


@pytest.mark.parametrize("rank, tile", [(16, (32, 64)), (32, (32, 64)), (40, (64, 64)), (128, (64, 64))])
def test_forward_tiles_by_rank(rank, tile):
    meta = _forward_meta([LowRank(torch.zeros(8, rank), torch.zeros(16, rank), 1.0)])
    assert (meta["BLOCK_M"], meta["BLOCK_N"]) == tile
