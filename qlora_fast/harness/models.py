"""Random-init causal LMs of real architectures and shapes, quantized to NF4 in place (no downloads)."""

import torch
from torch import nn

# Real shapes; the "tiny-*" ones keep every dimension a multiple of 64 so that bitsandbytes' CPU
# kernels (the stock reference on CPU) are exact, and the Llama-like ones' heads 32 wide, the narrowest the
# fused q/k/v rotates (patching/qkv.py), so that CPU tests take the path real shapes take.
MODEL_SHAPES = {
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                 rope_theta=500000.0, max_position_embeddings=8192)),
    "llama-3.2-1b": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                   num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                   rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen2.5-7b": ("qwen2", dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                 num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                 rope_theta=1000000.0, max_position_embeddings=32768)),
    "gemma-2-9b": ("gemma2", dict(vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                                  num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                  query_pre_attn_scalar=256, sliding_window=4096, attn_logit_softcapping=50.0,
                                  final_logit_softcapping=30.0, max_position_embeddings=8192)),
    # Phi-3.5-mini's shape with plain RoPE (its long-context rope scaling left out)
    "phi-3.5-mini": ("phi3", dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                                  pad_token_id=32000, bos_token_id=1, eos_token_id=32000)),
    "tiny-llama": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 max_position_embeddings=512)),
    "tiny-qwen2": ("qwen2", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                 max_position_embeddings=512)),
    "tiny-mistral": ("mistral", dict(vocab_size=512, hidden_size=64, intermediate_size=192,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=32, max_position_embeddings=512)),
    "tiny-qwen3": ("qwen3", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512)),
    "tiny-gemma2": ("gemma2", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=512, query_pre_attn_scalar=16)),
    "tiny-gemma3": ("gemma3_text", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        max_position_embeddings=512, query_pre_attn_scalar=16)),
    # 48-wide heads: half a head is no power of two, as in Phi-3.5-mini's 96-wide ones
    "tiny-phi3": ("phi3", dict(vocab_size=512, hidden_size=192, intermediate_size=256, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               pad_token_id=0)),
    "tiny-gemma": ("gemma", dict(vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 max_position_embeddings=512)),
}


def model_config(shape: str):
    from transformers import AutoConfig

    if shape not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(MODEL_SHAPES)}")
    model_type, kwargs = MODEL_SHAPES[shape]
    return AutoConfig.for_model(model_type, **kwargs)


def random_causal_lm(shape: str, dtype=torch.bfloat16, device="cpu", seed: int = 0):
    """A randomly initialised model of a known architecture and shape."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)


def quantize_to_nf4_(model: nn.Module, compute_dtype=torch.bfloat16, nested: bool = True,
                     skip: tuple = ("lm_head",), quant_storage=torch.uint8) -> nn.Module:
    """Replaces every nn.Linear (but `skip`) by a bitsandbytes NF4 Linear4bit, as
    `from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` would;
    `quant_storage` (bnb_4bit_quant_storage) is the dtype the packed bytes are stored as (FSDP shards
    only floating-point storage)."""
    import bitsandbytes as bnb

    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child_name in skip:
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=nested, quant_type="nf4",
                                  quant_storage=quant_storage, device="meta")
            # module=q: the layer keeps the quant state too, so that bitsandbytes can hand it back to a
            # weight FSDP re-created without it
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=nested,
                                         quant_type="nf4", quant_storage=quant_storage, module=q)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(module, child_name, q.to(child.weight.device))
    model.is_loaded_in_4bit = True
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def add_lora(model: nn.Module, r: int = 16, lora_alpha: int = 16, lora_dropout: float = 0.0,
             target_modules="all-linear", seed: int = 0, init_b_std: float = 0.0, alpha_pattern: dict | None = None):
    """peft LoRA on the model; `init_b_std` > 0 draws B at random so gradients flow into A at step 0;
    `alpha_pattern` (peft's) gives some modules their own alpha, hence their own scaling."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                        task_type="CAUSAL_LM", alpha_pattern=alpha_pattern or {})
    peft_model = get_peft_model(model, config)
    if init_b_std:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, init_b_std)
    return peft_model


RANDOM_PREFIX = "random:"
_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
    "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer (259 ids) with a chat template, built offline for random-init models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = _CHAT_TEMPLATE
    return fast
