"""The language-model half: LLaMA/Mistral decoder + vocabulary → `general.architecture = llama` GGUF.

Q and K projection rows are permuted as llama.cpp's converter does: HF's checkpoints rotate the two
halves of each head (`rotate_half`), llama.cpp rotates adjacent pairs, so within every head the rows
[0..d/2) and [d/2..d) are interleaved (`permute_qk`). A decoder reading this file applies llama.cpp's
"normal" adjacent-pair RoPE; `unpermute_qk` undoes the permutation.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from llava_jax.convert.layouts import Layout, detect_layout
from llava_jax.convert.vocab import load_vocab
from llava_jax.convert.writer import OUTTYPES, Plan, check_outtype, write_plans

_BLOCK = {  # HF decoder layer → GGUF block tensor
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (half-split rotary) row order → llama.cpp (interleaved pairs); w: [n_heads*head_dim, ...]."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of `permute_qk`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plan_language_model(layout: Layout, outtype: str) -> Plan:
    """Describe the language-model file for `layout` (raises LlavaError on a missing tensor or tokenizer)."""
    check_outtype(outtype)
    t = layout.text
    vocab = load_vocab(layout.model_dir, t.vocab_size, t.token_ids)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_name(layout.model_dir.name)
        w.add_file_type(int(OUTTYPES[outtype][1]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(t.vocab_size)
        w.add_context_length(t.context_length)
        w.add_embedding_length(t.hidden_size)
        w.add_block_count(t.n_layers)
        w.add_feed_forward_length(t.intermediate_size)
        w.add_head_count(t.n_heads)
        w.add_head_count_kv(t.n_kv_heads)
        w.add_rope_freq_base(t.rope_theta)
        w.add_layer_norm_rms_eps(t.rms_eps)
        w.add_rope_dimension_count(t.head_dim)
        if t.head_dim * t.n_heads != t.hidden_size:
            w.add_key_length(t.head_dim)
            w.add_value_length(t.head_dim)
        if t.rope_scaling is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(t.rope_scaling[1])
        vocab.add_to(w)

    plan = Plan("llama", metadata)

    def add(gguf_name: str, hf_name: str, permute_heads: int | None = None) -> None:
        shape, load = layout.text_tensor(hf_name)
        if permute_heads is not None:
            load = (lambda f=load, h=permute_heads: permute_qk(f(), h))
        plan.add(gguf_name, shape, load, outtype)

    add("token_embd.weight", "embed_tokens.weight")
    for i in range(t.n_layers):
        for hf, short in _BLOCK.items():
            heads = t.n_heads if short == "attn_q" else t.n_kv_heads if short == "attn_k" else None
            add(f"blk.{i}.{short}.weight", f"layers.{i}.{hf}.weight", heads)
            if t.attention_bias and short in ("attn_q", "attn_k", "attn_v", "attn_output"):
                if layout.has_text_tensor(f"layers.{i}.{hf}.bias"):
                    add(f"blk.{i}.{short}.bias", f"layers.{i}.{hf}.bias", heads)
    add("output_norm.weight", "norm.weight")
    if not t.tied:
        add("output.weight", "lm_head.weight")
    return plan


def write_language_model(model_dir: str | os.PathLike[str], out_path: str | os.PathLike[str], outtype: str = "f16",
                         progress: bool = False) -> Path:
    """Convert the language half (+ vocabulary) of the LLaVA checkpoint in `model_dir` to a llama GGUF.

    Raises LlavaError for an unknown layout, a missing shard/tensor/tokenizer or an unsupported out type.
    """
    check_outtype(outtype)
    layout = detect_layout(model_dir, text_only=True)  # an original 1.5 needs no CLIP directory here
    write_plans([(plan_language_model(layout, outtype), Path(out_path))], progress=progress)
    return Path(out_path)

