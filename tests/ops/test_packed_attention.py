"""ops/packed_attention.py: sequence bounds by transformers' rule; attention within each sequence against a
float64 dense block-causal reference."""

import pytest
import torch
import torch.nn.functional as F
from transformers.masking_utils import find_packed_sequence_indices

from qlora_fast.ops.packed_attention import PackedSequences, backend, find_packed_sequences, packed_attention


def positions(*rows):
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])


@pytest.mark.parametrize("rows", [[(5, 9, 7)], [(3, 13), (16,)], [(4, 4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1)]])
def test_sequences_follow_transformers_rule(rows):
    position_ids = positions(*rows)
    sequences = find_packed_sequences(position_ids, len(rows))
    ids = find_packed_sequence_indices(position_ids)  # per row: which sequence each token belongs to
    flat = (ids + torch.arange(len(rows))[:, None] * 1000).reshape(-1)  # rows never share a sequence
    ends = (flat.diff() != 0).nonzero().squeeze(1) + 1
    assert sequences.cu_seqlens.tolist() == [0, *ends.tolist(), position_ids.numel()]
    assert sequences.max_length == max(n for lengths in rows for n in lengths)
    assert sequences.cu_seqlens.dtype == torch.int32


def test_unpacked_rows_are_not_sequences():
    assert find_packed_sequences(torch.arange(12)[None], 3) is None  # (1, L) broadcast over the batch
    assert find_packed_sequences(positions((12,), (12,)), 2) is None


def dense_reference(q, k, v, position_ids, scale):
    """float64 attention with transformers' block-causal mask: causal, and only within a sequence."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(groups, dim=1) for t in (k, v))
    ids = find_packed_sequence_indices(position_ids)
    length = q.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal & (ids[:, :, None] == ids[:, None, :])
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_within_each_sequence(dtype):
    torch.manual_seed(0)
    position_ids = positions((5, 9, 7, 11), (2, 30))
    batch, length = position_ids.shape
    q = torch.randn(batch, 4, length, 16, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(batch, 2, length, 16, dtype=dtype, requires_grad=True) for _ in range(2))  # GQA
    scale = 0.3
    sequences = find_packed_sequences(position_ids, batch)
    out = packed_attention(q, k, v, sequences, scale)
    ref = dense_reference(q, k, v, position_ids, scale)
    assert out.shape == (batch, length, 4, 16)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((out.double() - ref).norm() / ref.norm()) < tolerance
    grad = torch.randn_like(out)
    out.backward(grad)
    mine = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref.backward(grad.double())
    for a, b in zip(mine, (q.grad, k.grad, v.grad)):
        assert ((a.double() - b.double()).norm() / b.double().norm()) < tolerance * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dropped_boundary_is_caught(dtype):
    """The reference has teeth: one missing sequence boundary (attention across two sequences) fails it."""
    torch.manual_seed(0)
    position_ids = positions((5, 9, 7))
    q, k, v = (torch.randn(1, 2, 21, 16, dtype=dtype) for _ in range(3))
    merged = PackedSequences(torch.tensor([0, 14, 21], dtype=torch.int32), 14)
    out = packed_attention(q, k, v, merged)
    ref = dense_reference(q, k, v, position_ids, 16 ** -0.5)
    assert ((out.double() - ref).norm() / ref.norm()) > 0.1  # 5x the bf16 tolerance above


def test_cpu_takes_the_per_sequence_path():
    assert backend(torch.randn(8, 2, 16, dtype=torch.bfloat16)) == "per_sequence"


def test_a_gpu_without_a_varlen_kernel_keeps_the_dense_mask(monkeypatch):
    import qlora_fast.ops.packed_attention as op

    assert op.worth_it_on(torch.device("cpu"))
    monkeypatch.setattr(op, "_FLASH_ATTN_VARLEN", None)
    monkeypatch.setattr(op, "_TORCH_VARLEN_ARGS", set())
    assert not op.worth_it_on(torch.device("cuda"))
    monkeypatch.setattr(op, "_TORCH_VARLEN_ARGS", {"window_size"})
    assert op.worth_it_on(torch.device("cuda"))


def _reference_varlen(q, k, v, cu, scale, causal=True):
    """A flash-style varlen attention on (tokens, heads, dim), by sequence, to stand in for the GPU kernels."""
    assert causal and q.shape[1] % k.shape[1] == 0 and cu.dtype == torch.int32
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
    bounds = cu.tolist()
    pieces = [F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True,
                                             scale=scale).transpose(0, 1) for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces)


def fake_flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal):
    assert torch.equal(cu_q, cu_k) and max_q == max_k == int(cu_q.diff().max()) and dropout_p == 0.0
    return _reference_varlen(q, k, v, cu_q, softmax_scale, causal)


def fake_torch_varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                           window_size=(-1, -1)):
    """torch 2.11's signature: no enable_gqa (k/v must have the query's heads), causal as window (-1, 0)."""
    assert query.shape[1] == key.shape[1] and window_size == (-1, 0) and max_q == int(cu_seq_q.diff().max())
    return _reference_varlen(query, key, value, cu_seq_q, scale)


def fake_torch_varlen_gqa(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    assert enable_gqa == (query.shape[1] != key.shape[1]) and window_size == (-1, 0)
    return _reference_varlen(query, key, value, cu_seq_q, scale)


@pytest.mark.parametrize("kernel", ["flash_attn", "torch 2.11 varlen_attn", "torch varlen_attn with enable_gqa"])
def test_gpu_backends_get_their_arguments_right(monkeypatch, kernel):
    """The GPU kernels stood in for by a reference that checks its arguments as the real signature does."""
    import inspect

    import qlora_fast.ops.packed_attention as op

    monkeypatch.setattr(op, "_flash_kernel_applies", lambda q: True)
    if kernel == "flash_attn":
        monkeypatch.setattr(op, "_FLASH_ATTN_VARLEN", fake_flash_attn)
    else:
        fake = fake_torch_varlen_2_11 if kernel.startswith("torch 2.11") else fake_torch_varlen_gqa
        monkeypatch.setattr(op, "_FLASH_ATTN_VARLEN", None)
        monkeypatch.setattr(op, "_TORCH_VARLEN", fake)
        monkeypatch.setattr(op, "_TORCH_VARLEN_ARGS", set(inspect.signature(fake).parameters))
    torch.manual_seed(0)
    position_ids = positions((5, 9, 7, 11))
    q = torch.randn(1, 4, 32, 16, requires_grad=True)
    k, v = (torch.randn(1, 2, 32, 16, requires_grad=True) for _ in range(2))
    out = packed_attention(q, k, v, find_packed_sequences(position_ids, 1), 0.3)
    ref = dense_reference(q, k, v, position_ids, 0.3)
    assert op.backend(q) != "per_sequence"
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-5
