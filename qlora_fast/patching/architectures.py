"""What each model family looks like to patch_model: one row per family, and the structural fallback.

A row names the family's classes and says which of them compute exactly what a fused path replaces:
- gated_mlp: the MLP's forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)) (act_fn checked per module
  as SiLU or torch's tanh-approximated GELU); gate_up_mlp: it is down_proj(up * activation_fn(gate)) with
  [gate | up] = gate_up_proj(x) (Phi-3; activation_fn checked as SiLU);
- qkv_attention: the attention projects one hidden-states tensor with q_proj, k_proj and v_proj, in order;
  qkv_proj_attention: its forward is Phi-3's: [q | k | v] = qkv_proj(x) split by whole heads, viewed as
  (batch, heads, seq, head_dim), q and k rotated by its module's apply_rotary_pos_emb, the KV cache
  updated, attention through transformers' attention functions, then o_proj (patching/qkv.py runs that
  forward over the fused q/k/v Function);
- llama_norm: the RMSNorm is w * round(x * rsqrt(mean(x^2) + eps)); gemma_norm: it is Gemma's
  round(x * rsqrt(mean(x^2) + eps) * (1 + w)), in fp32 (eps in `.eps`);
- llama_layer: the decoder layer is Llama's `residual + self_attn(input_layernorm(x))` then
  `residual + mlp(post_attention_layernorm(residual))` (add_norm), or Phi-3's, the same with a dropout on
  each branch before its add (resid_attn_dropout, resid_mlp_dropout; served while they drop nothing);
- mlp_to_residual: the decoder layer's only use of its MLP's output is adding it to the residual, through
  a dropout at most (Llama's layer, Gemma 1's, Phi-3's; not Gemma 2/3's, whose norm after the MLP reads it
  in backward): a checkpoint's recompute need not compute it;
- rotary: the attention's modeling module applies transformers' standard apply_rotary_pos_emb (Phi-3's
  rotates the first cos.shape[-1] dims of each head: the standard one where that is the whole head);
  rotary_projections: and the attention hands it q_proj's and k_proj's outputs on its hidden states, viewed
  as (batch, heads, seq, head_dim), and the decoder layer's position_embeddings, with nothing in between
  (no q/k norms), so the fused q/k/v may return them rotated;
- attention_interface: the attention is causal softmax attention through transformers' attention
  functions, handed the decoder layer's kwargs, without softcapping (patching/attention.py: packed
  batches and kept attention outputs are served there);
- scaled_embedding: the input embedding is an nn.Embedding whose forward is its rows times
  `embed_scale.to(weight.dtype)` (Gemma's);
- plain_head: the training loss is cross-entropy of lm_head(hidden states), softcapped as
  c * tanh(logits / c) where config.final_logit_softcapping = c is set (no other logit scaling, no
  auxiliary loss).
A class whose name is in no row is still recognized for all but the rotary ones and plain_head when its
forward is one a row vouches for: inherited unchanged, or the same source (a renamed copy, as remote-code
models often are).
Adding a family is adding a row.
"""

import inspect
import sys
from dataclasses import dataclass, replace
from functools import lru_cache


@dataclass(frozen=True)
class Architecture:
    family: str  # transformers.models.<family>.modeling_<family>
    causal_lm: str
    decoder_layer: str
    attention: str
    mlp: str
    rms_norm: str
    gated_mlp: bool
    qkv_attention: bool
    llama_norm: bool
    llama_layer: bool
    rotary: bool
    plain_head: bool
    attention_interface: bool = True
    gate_up_mlp: bool = False
    gemma_norm: bool = False
    rotary_projections: bool = False
    mlp_to_residual: bool = False
    embedding: str = ""
    scaled_embedding: bool = False
    qkv_proj_attention: bool = False


def _llama_like(family: str, prefix: str) -> Architecture:
    return Architecture(family, f"{prefix}ForCausalLM", f"{prefix}DecoderLayer", f"{prefix}Attention", f"{prefix}MLP",
                        f"{prefix}RMSNorm", gated_mlp=True, qkv_attention=True, llama_norm=True, llama_layer=True,
                        rotary=True, plain_head=True, rotary_projections=True, mlp_to_residual=True)


ARCHITECTURES = (
    _llama_like("llama", "Llama"),
    _llama_like("mistral", "Mistral"),
    _llama_like("qwen2", "Qwen2"),  # q/k/v with a frozen base bias: fused, the bias inside the GEMM
    # q/k norms after the projections: the projections still fuse, RoPE stays apart
    replace(_llama_like("qwen3", "Qwen3"), rotary_projections=False),
    # GeGLU MLPs (gelu_pytorch_tanh), (1 + w) norms in fp32
    Architecture("gemma", "GemmaForCausalLM", "GemmaDecoderLayer", "GemmaAttention", "GemmaMLP", "GemmaRMSNorm",
                 gated_mlp=True, qkv_attention=True, llama_norm=False, llama_layer=False, rotary=True,
                 plain_head=True, gemma_norm=True, mlp_to_residual=True, embedding="GemmaTextScaledWordEmbedding",
                 scaled_embedding=True),
    # and the logits softcapped (inside the loss kernel), the attention scores too: packed batches keep the
    # dense mask, attention outputs are recomputed
    Architecture("gemma2", "Gemma2ForCausalLM", "Gemma2DecoderLayer", "Gemma2Attention", "Gemma2MLP",
                 "Gemma2RMSNorm", gated_mlp=True, qkv_attention=True, llama_norm=False, llama_layer=False,
                 rotary=True, plain_head=True, attention_interface=False, gemma_norm=True,
                 embedding="Gemma2TextScaledWordEmbedding", scaled_embedding=True),
    Architecture("gemma3", "Gemma3ForCausalLM", "Gemma3DecoderLayer", "Gemma3Attention", "Gemma3MLP",
                 "Gemma3RMSNorm", gated_mlp=True, qkv_attention=True, llama_norm=False, llama_layer=False,
                 rotary=True, plain_head=True, gemma_norm=True, embedding="Gemma3TextScaledWordEmbedding",
                 scaled_embedding=True),
    # fused qkv_proj (one LoRA layer already) and gate_up_proj (its halves fused as a SwiGLU MLP); RoPE on the
    # kernel where it rotates whole heads (else its stock function), residual dropouts in the layer
    Architecture("phi3", "Phi3ForCausalLM", "Phi3DecoderLayer", "Phi3Attention", "Phi3MLP", "Phi3RMSNorm",
                 gated_mlp=False, qkv_attention=False, llama_norm=True, llama_layer=True, rotary=True,
                 plain_head=True, gate_up_mlp=True, mlp_to_residual=True, qkv_proj_attention=True),
)

# The role of each property: which class of a row it qualifies.
_ROLE = {"gated_mlp": "mlp", "qkv_attention": "attention", "llama_norm": "rms_norm",
         "llama_layer": "decoder_layer", "rotary": "attention", "plain_head": "causal_lm",
         "attention_interface": "attention", "gate_up_mlp": "mlp", "gemma_norm": "rms_norm",
         "rotary_projections": "attention", "mlp_to_residual": "decoder_layer", "scaled_embedding": "embedding",
         "qkv_proj_attention": "attention"}
_STRUCTURAL = ("gated_mlp", "qkv_attention", "llama_norm", "llama_layer", "attention_interface", "gate_up_mlp",
               "gemma_norm", "mlp_to_residual", "scaled_embedding")


@lru_cache(maxsize=None)
def class_names(prop: str) -> frozenset:
    """The class names the table vouches for `prop`."""
    return frozenset(getattr(a, _ROLE[prop]) for a in ARCHITECTURES if getattr(a, prop))


def _modeling_module(family: str):
    return sys.modules.get(f"transformers.models.{family}.modeling_{family}")


@lru_cache(maxsize=None)
def _vouched_sources(prop: str, loaded: tuple) -> frozenset:
    """The forward source of each class the table vouches for `prop` among the `loaded` families (one not
    imported by this process cannot be the model's)."""
    rows = [a for a in ARCHITECTURES if a.family in loaded and getattr(a, prop)]
    classes = [getattr(_modeling_module(a.family), getattr(a, _ROLE[prop]), None) for a in rows]
    return frozenset(_forward_source(cls) for cls in classes if cls is not None)


@lru_cache(maxsize=None)
def _forward_source(cls) -> str:
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ""


def has(module, prop: str) -> bool:
    """Whether `module` computes what the table's `prop` says: by class name, or (for the structural
    properties) by a forward the table vouches for."""
    cls = type(module)
    if cls.__name__ in class_names(prop):
        return True
    if prop not in _STRUCTURAL:
        return False
    source = _forward_source(cls)
    loaded = tuple(a.family for a in ARCHITECTURES if _modeling_module(a.family) is not None)
    return bool(source) and source in _vouched_sources(prop, loaded)
