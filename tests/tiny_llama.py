"""Tiny llama-architecture GGUF files with chosen tensor types, for storage / layout tests.

The vocabulary and tokenizer are SmolLM2's (copied from the real file's metadata), the widths tiny
(dim 256, 2 layers, FFN 512, 4 heads, 2 KV heads). Weights are random blocks with small finite f16
scales (`test_qgemv.random_blocks`) or N(0, 0.05) values for F32 / F16.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from llava_jax.qtensor import Q

DIM, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2  # widths: whole 256-value K-quant blocks


def _random(shape, qtype, rng) -> tuple[np.ndarray, Q | None]:
    from test_qgemv import random_blocks

    if qtype == Q.F32:
        return (0.05 * rng.standard_normal(shape)).astype(np.float32), None
    if qtype == Q.F16:
        return (0.05 * rng.standard_normal(shape)).astype(np.float16), None
    blocks = random_blocks(qtype, shape[0], shape[1], int(rng.integers(1 << 30)))
    return blocks.reshape(shape[0], -1), qtype


def write_tiny_llama(path: Path, source: Path, types: dict[str, Q] | None = None, rope_freqs: np.ndarray | None = None,
                     extra_metadata: dict | None = None, seed: int = 0) -> Path:
    """Write a tiny model: `types` maps a weight kind (e.g. "attn_v", "token_embd") or a full tensor name
    to its type (default Q8_0 for matrices); `rope_freqs` adds that tensor; `extra_metadata` adds keys."""
    types = types or {}
    reader = gguf.GGUFReader(str(source))
    w = gguf.GGUFWriter(str(path), arch="llama")
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") or name in ("general.name",):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), field.types[0], sub_type=sub)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].contents())
    w.add_context_length(512)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    for key, value in (extra_metadata or {}).items():
        w.add_key_value(key, value, gguf.GGUFValueType.STRING if isinstance(value, str) else gguf.GGUFValueType.FLOAT32)
    rng = np.random.default_rng(seed)
    hd = DIM // HEADS
    shapes = {"token_embd.weight": (vocab, DIM), "output_norm.weight": (DIM,), "output.weight": (vocab, DIM)}
    for i in range(LAYERS):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (DIM,), p + "attn_q.weight": (DIM, DIM),
                   p + "attn_k.weight": (KV_HEADS * hd, DIM), p + "attn_v.weight": (KV_HEADS * hd, DIM),
                   p + "attn_output.weight": (DIM, DIM), p + "ffn_norm.weight": (DIM,),
                   p + "ffn_gate.weight": (FFN, DIM), p + "ffn_up.weight": (FFN, DIM), p + "ffn_down.weight": (DIM, FFN)}
    for name, shape in shapes.items():
        kind = name.split(".")[-2]
        if len(shape) == 1:
            w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32))
            continue
        qtype = types.get(name, types.get(kind, Q.Q8_0))
        data, raw = _random(shape, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
