"""peft's QLoRA recipe: `prepare_model_for_kbit_training` upcasts a bf16 checkpoint's norms, embeddings and
head to fp32, so every projection's input is fp32 while bitsandbytes computes in bf16. Stock peft returns
the bf16 base output plus the LoRA term summed in fp32; a term under half a bf16 ulp of the base output
must survive the patched path too (ops/adapters.py `wider`), and the fp32 head held in bf16 must change
nothing."""

import pytest
import torch
from peft import prepare_model_for_kbit_training

from qlora_fast import patch_model, unpatch_model
from qlora_fast.harness.models import add_lora, quantize_to_nf4_, random_causal_lm
from qlora_fast.ops import adapters, lora_nf4_qkv
from qlora_fast.ops.offloaded_checkpoint import recomputing
from qlora_fast.patching import mlp, norms, qkv, rotary
from qlora_fast.patching.core import NARROWED_FROM
from tests.helpers import doubled_gate_term, rel_err


def prepared_tiny(shape="tiny-llama", b_std=1e-5, r=16):
    """B this small puts every LoRA term below half a bf16 ulp of its base output (hidden states ~ 1)."""
    model = quantize_to_nf4_(random_causal_lm(shape, torch.bfloat16), compute_dtype=torch.bfloat16)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return add_lora(model, r=r, lora_alpha=r, init_b_std=b_std).train()


def _outputs(layer, x):
    """Each LoRA module's output of layer 0 for input x: q, k, v (called in that order), o_proj, the MLP."""
    attn = layer.self_attn
    x_o = x.repeat(1, 1, attn.o_proj.in_features // x.shape[-1])  # the heads may be wider than the model
    return {"q": attn.q_proj(x), "k": attn.k_proj(x), "v": attn.v_proj(x), "o": attn.o_proj(x_o), "mlp": layer.mlp(x)}


def _lora_terms(model, x):
    """Per module: (stock output - base output, patched output - base output) on the same x."""
    layer = model.base_model.model.model.layers[0]
    with torch.no_grad():
        stock = _outputs(layer, x)
        with model.disable_adapter():
            base = _outputs(layer, x)
        patch_model(model, verbose=False)
        patched = _outputs(layer, x)
    unpatch_model(model)
    return {k: (stock[k] - base[k], patched[k] - base[k]) for k in stock}


# The MLP's term passes through silu and the down projection's bf16 input cast: elements whose rounding of
# h flips with the term's last bits move the difference by a bf16 ulp of the base, hence the looser bound.
TOLERANCE = {"q": 2e-2, "k": 2e-2, "v": 2e-2, "o": 2e-2, "mlp": 0.3}


@pytest.mark.parametrize("rounded_sums", [False, True], ids=["fp32 sums", "mutant: bf16 sums"])
@pytest.mark.parametrize("rank", [16, 64])  # 64: the MLP's terms stay out of its GEMMs (ops/terms_in_gemm.py)
def test_lora_terms_below_a_bf16_ulp_survive(rounded_sums, rank, monkeypatch):
    model = prepared_tiny(r=rank)
    assert model.base_model.model.model.norm.weight.dtype == torch.float32
    if rounded_sums:  # today's rounding before this test existed: the base + term sum rounded to bf16
        monkeypatch.setattr(adapters, "wider", lambda dtype, compute_dtype: False)
        monkeypatch.setattr("qlora_fast.ops.lora_nf4_mlp.wider", lambda dtype, compute_dtype: False)
    x = torch.randn(2, 16, 64)  # fp32, as the upcast norms hand it on
    terms = _lora_terms(model, x)
    for name, (stock, patched) in terms.items():
        assert stock.abs().max() > 0, name
        if rounded_sums:
            assert rel_err(patched, stock) > 2 * TOLERANCE[name], name
        else:
            assert patched.dtype == torch.float32
            assert rel_err(patched, stock) < TOLERANCE[name], name


def test_prepared_model_under_autocast_matches_stock_and_holds_head_in_bf16():
    model = prepared_tiny(b_std=0.02)
    ids = torch.randint(0, 512, (2, 24))
    lm = model.base_model.model

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    stock_loss, stock_grads = loss_and_grads()
    report = patch_model(model, verbose=False)
    assert report.bf16_stored == 2 and report.qkv == 2 and report.mlps == 2
    assert lm.lm_head.weight.dtype == torch.bfloat16 and lm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert lm.model.embed_tokens(ids).dtype == torch.float32
    loss, grads = loss_and_grads()
    assert loss == pytest.approx(stock_loss, rel=2e-3)
    assert grads.keys() == stock_grads.keys() and len(grads) == 28
    for name in grads:
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), stock_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
    with torch.no_grad():  # evaluation outside autocast: the head computes from the exact fp32 values
        hidden = torch.randn(3, 64)
        assert torch.equal(lm.lm_head(hidden), hidden @ lm.lm_head.weight.float().t())
    unpatch_model(model)
    assert lm.lm_head.weight.dtype == torch.float32 and lm.model.embed_tokens.weight.dtype == torch.float32
    assert "forward" not in vars(lm.lm_head) and "forward" not in vars(lm.model.embed_tokens)


def test_weights_with_values_beyond_bf16_stay_fp32():
    model = prepared_tiny()
    lm = model.base_model.model
    with torch.no_grad():
        lm.lm_head.weight[0, 0] += 1e-6
    assert patch_model(model, verbose=False).bf16_stored == 1  # the embedding only
    assert lm.lm_head.weight.dtype == torch.float32


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"])
def test_held_embeddings_return_what_stock_returns(shape):
    """Gemma's scaled embedding shares its weight with the head: held in bf16 for both, its rows and scale
    still in fp32, so the residual stream keeps stock's dtype and values."""
    model = prepared_tiny(shape)
    embed = model.base_model.model.model.embed_tokens
    ids = torch.randint(0, 512, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = embed(ids)
        patch_model(model, verbose=False)
        patched = embed(ids)
    assert embed.weight.dtype == torch.bfloat16
    assert patched.dtype == stock.dtype == torch.float32 and torch.equal(patched, stock)


def _residual_stream_dtypes(model, ids) -> list:
    """The dtype of the embedding output, each layer's output and the logits, under autocast (asked of
    the model, not of hooks, which would turn fused paths off)."""
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    return [h.dtype for h in out.hidden_states] + [out.logits.dtype]


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen3", "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"])
def test_the_residual_stream_keeps_stocks_dtype(shape):
    """Held weights and narrowed outputs leave the prepared model's residual stream in stock's fp32: a
    bf16 stream rounds every residual add, which loss tolerances can miss."""
    model = prepared_tiny(shape, b_std=0.02)
    ids = torch.randint(0, 512, (2, 8))
    stock = _residual_stream_dtypes(model, ids)
    patch_model(model, verbose=False)
    assert _residual_stream_dtypes(model, ids) == stock
    assert stock[0] == torch.float32


def test_a_weight_tied_to_a_module_kept_as_is_stays_fp32():
    class OwnEmbedding(torch.nn.Embedding):  # a forward the table does not vouch for
        def forward(self, input_ids):
            return super().forward(input_ids) * 2

    model = prepared_tiny()
    lm = model.base_model.model
    own = OwnEmbedding(*lm.model.embed_tokens.weight.shape)
    own.weight = lm.lm_head.weight
    lm.model.embed_tokens = own
    assert patch_model(model, verbose=False).bf16_stored == 0
    assert lm.lm_head.weight.dtype == torch.float32


def _autocast_loss_and_grads(model, ids):
    """A training step's loss and gradients as Trainer(bf16=True) and TRL compute them: autocast, no KV cache."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _narrowed_norm_outputs(monkeypatch) -> list:
    """Records the dtype of each norm output the patched decoder layers hand on narrowed."""
    narrowed, add_norm_for = [], norms._add_norm_for

    def recording(*args):
        residual, hidden = add_norm_for(*args)
        if hasattr(hidden, NARROWED_FROM):
            narrowed.append(hidden.dtype)
        return residual, hidden

    monkeypatch.setattr(norms, "_add_norm_for", recording)
    return narrowed


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mutant", [False, True], ids=["narrowed", "mutant: narrowed outputs"])
def test_norms_handed_on_narrowed_change_no_loss_or_gradient(shape, mutant, monkeypatch):
    """Under autocast the norms before the fused q/k/v and MLP write bf16 (their consumers round to it
    first): the loss and every gradient bit for bit as with the fp32 norms. The mutant's Functions return
    the narrowed dtype instead of stock's (fp32): that must show."""
    model = prepared_tiny(shape, b_std=0.02)
    ids = torch.randint(0, 512, (2, 24))
    patch_model(model, verbose=False)
    with monkeypatch.context() as wide_norms:  # the reference: nothing narrowed
        wide_norms.setattr(norms, "attention_rounds_its_input", lambda attention, x: False)
        wide_norms.setattr(norms, "mlp_rounds_its_input", lambda mlp: False)
        wide_loss, wide_grads = _autocast_loss_and_grads(model, ids)
    narrowed = _narrowed_norm_outputs(monkeypatch)
    if mutant:
        for module in (qkv, mlp):
            monkeypatch.setattr(module, "stock_dtype", lambda x: x.dtype)
    loss, grads = _autocast_loss_and_grads(model, ids)
    assert narrowed == [torch.bfloat16] * 4  # 2 layers x (attention, MLP)
    same = torch.equal(loss, wide_loss) and all(torch.equal(grads[n], wide_grads[n]) for n in wide_grads)
    assert same != mutant


def test_norms_stay_wide_where_a_consumer_would_see_the_difference(monkeypatch):
    """No narrowing without autocast, for an attention with a hook, or for adapters with dropout."""
    model = prepared_tiny(b_std=0.02)
    ids = torch.randint(0, 512, (2, 8))
    patch_model(model, verbose=False)
    narrowed = _narrowed_norm_outputs(monkeypatch)
    model(input_ids=ids)
    assert narrowed == []
    layers = model.base_model.model.model.layers
    handle = layers[0].self_attn.register_forward_pre_hook(lambda module, args: None)
    layers[1].mlp.gate_proj.lora_dropout["default"] = torch.nn.Dropout(0.1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids)
    assert narrowed == [torch.bfloat16] * 2  # layer 0's MLP and layer 1's attention only
    handle.remove()


def _recorded_attention_input_dtypes(monkeypatch) -> list:
    """Records the dtype of each RoPE output and each fused v the patched attentions hand on (and of q and
    k where the fused q/k/v rotates them)."""
    seen, apply, fused_qkv = [], rotary.apply, qkv.lora_nf4_qkv

    def recorded(outputs):
        seen.extend(t.dtype for t in outputs)
        return outputs

    def recorded_qkv(*args, **kwargs):
        q, k, v = fused_qkv(*args, **kwargs)
        recorded((q, k, v) if kwargs.get("rotary") is not None else (v,))
        return q, k, v

    monkeypatch.setattr(rotary, "apply", lambda *args: recorded(apply(*args)))
    monkeypatch.setattr(qkv, "lora_nf4_qkv", recorded_qkv)
    return seen


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("mutant,checkpointing", [(False, False), (False, True), (True, False)],
                         ids=["rounded by attention", "rounded by attention, offloaded checkpoints",
                              "mutant: q rounded before RoPE"])
def test_attention_inputs_written_as_attention_rounds_them_change_nothing(shape, mutant, checkpointing,
                                                                          monkeypatch):
    """Under autocast with sdpa, RoPE writes q and k and the fused q/k/v writes v in bf16, which sdpa rounds
    them to first: the loss and every gradient bit for bit as with fp32 q, k and v, with offloaded
    checkpoints too (the recompute takes the kept q/k/v base outputs). The mutant rotates q and k rounded
    to bf16 first (RoPE's products in bf16): that must show."""
    model = prepared_tiny(shape, b_std=0.02)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 512, (2, 24))
    if checkpointing:
        model.enable_input_require_grads()
        model.gradient_checkpointing_enable()
    assert patch_model(model, verbose=False).kept_outputs == 8  # q/k/v and o of 2 layers, where checkpointed
    with monkeypatch.context() as wide:  # the reference: q, k and v handed on in fp32
        wide.setattr(norms, "_attention_rounding", lambda *args: None)
        wide_loss, wide_grads = _autocast_loss_and_grads(model, ids)
    if mutant:  # on the RoPE drop-in's path and on the fused q/k/v's
        apply, rope = rotary.apply, lora_nf4_qkv.rope_plus_low_rank
        monkeypatch.setattr(rotary, "apply", lambda fn, q, k, cos, sin, out: apply(
            fn, *(t if out is None else t.to(out) for t in (q, k, cos, sin)), None))
        monkeypatch.setattr(lora_nf4_qkv, "rope_plus_low_rank", lambda y, q_term, k_term, cos, sin, seq_len, out,
                            q_dtype: rope(y, q_term, k_term, cos.to(out.dtype), sin.to(out.dtype), seq_len, out,
                                          out.dtype))
    seen = _recorded_attention_input_dtypes(monkeypatch)
    loss, grads = _autocast_loss_and_grads(model, ids)
    assert seen.count(torch.bfloat16) == 3 * 2 * (2 if checkpointing else 1)  # q, k, v: 2 layers, each pass
    same = torch.equal(loss, wide_loss) and all(torch.equal(grads[n], wide_grads[n]) for n in wide_grads)
    assert same != mutant


def test_attention_inputs_stay_wide_where_the_attention_would_see_them(monkeypatch):
    model = prepared_tiny(b_std=0.02)
    attention = model.base_model.model.model.layers[0].self_attn
    assert norms._attention_rounding(attention, None, "cpu") is None  # no autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert norms._attention_rounding(attention, None, "cpu") == torch.bfloat16  # sdpa
        assert norms._attention_rounding(attention, object(), "cpu") is None  # a KV cache stores them
        monkeypatch.setattr(attention.config, "_attn_implementation", "eager")
        monkeypatch.setattr(attention, "attention_dropout", 0.1)
        assert norms._attention_rounding(attention.eval(), None, "cpu") == torch.bfloat16
        assert norms._attention_rounding(attention.train(), None, "cpu") is None  # dropout on fp32 weights
        monkeypatch.setattr(attention.config, "_attn_implementation", "flex_attention")
        assert norms._attention_rounding(attention.eval(), None, "cpu") is None
        monkeypatch.setattr(attention.config, "_attn_implementation", "sdpa")
        handle = attention.register_forward_hook(lambda *args: None)
        assert norms._attention_rounding(attention, None, "cpu") is None
        handle.remove()


@pytest.mark.parametrize("shape", ["tiny-gemma2", "tiny-phi3", "tiny-qwen3"])
@pytest.mark.parametrize("mutant", [False, True], ids=["patched", "mutant: MLP gate scaling doubled"])
def test_other_families_prepared_and_checkpointed_match_stock(shape, mutant, monkeypatch):
    """peft's recipe (prepared, autocast, checkpointing) on the families whose layers differ from Llama's:
    Gemma-2's offset norms around both sublayers and softcapped logits, Phi-3's fused gate/up and q/k/v
    projections, Qwen3's q/k norms. Loss and every LoRA gradient as stock's; the mutant must show."""
    from qlora_fast.ops import lora_nf4_mlp

    model = prepared_tiny(shape, b_std=0.02)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 512, (2, 24))
    stock_loss, stock_grads = _autocast_loss_and_grads(model, ids)
    report = patch_model(model, verbose=False)
    assert report.mlps == 2
    if mutant:
        monkeypatch.setattr(lora_nf4_mlp, "swiglu_forward", doubled_gate_term(lora_nf4_mlp.swiglu_forward))
    loss, grads = _autocast_loss_and_grads(model, ids)
    assert grads.keys() == stock_grads.keys()
    worst = min(torch.nn.functional.cosine_similarity(grads[n].float().flatten(), stock_grads[n].float().flatten(),
                                                      dim=0).item() for n in grads)
    matches = loss.item() == pytest.approx(stock_loss.item(), rel=2e-3) and worst > 0.999
    assert matches != mutant, (loss.item(), stock_loss.item(), worst)


@pytest.mark.parametrize("mutant", [False, True], ids=["patched", "mutant: gate term doubled in its GEMM"])
@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-gemma", "tiny-phi3"])  # Phi-3: gate_up_proj's halves
def test_recompute_with_terms_in_the_gemms_matches_stock(shape, mutant, monkeypatch):
    """At r=64 a prepared model's checkpoint recompute takes the MLP's terms in its GEMMs (one rounding of
    base + term, for the backward alone; ops/terms_in_gemm.py), the first pass keeps stock's fp32 sums:
    loss and every LoRA gradient as stock's; the mutant must show."""
    from qlora_fast.ops import lora_nf4_mlp

    model = prepared_tiny(shape, b_std=0.02, r=64)
    model.enable_input_require_grads()
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 512, (2, 24))
    stock_loss, stock_grads = _autocast_loss_and_grads(model, ids)
    patch_model(model, verbose=False)
    taken, gate_up = [], lora_nf4_mlp.gate_up_with_terms

    def spied(x, a, gate, up, dtype):
        taken.append(recomputing())
        b, s, w = gate
        return gate_up(x, a, (b, 2 * s if mutant else s, w), up, dtype)

    monkeypatch.setattr(lora_nf4_mlp, "gate_up_with_terms", spied)
    loss, grads = _autocast_loss_and_grads(model, ids)
    assert taken == [True, True]  # each layer's recompute, never the first pass
    assert loss.item() == pytest.approx(stock_loss.item(), rel=2e-3)  # the first pass: stock's sums
    worst = min(torch.nn.functional.cosine_similarity(grads[n].float().flatten(), stock_grads[n].float().flatten(),
                                                      dim=0).item() for n in grads)
    assert (worst > 0.999) != mutant, worst
