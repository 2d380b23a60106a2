"""Frozen configuration dataclasses read from GGUF metadata.

Configs are hashable so they can be static arguments to `jax.jit`. `TextConfig` describes the LLaMA
decoder; `VisionConfig` (below) the CLIP tower + projector of an mmproj file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llava_jax.errors import LlavaError

TEXT_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class RopeScaling:
    """`linear` divides positions by `factor`; `none` is plain RoPE. (llama3-style per-frequency
    factors come as the `rope_freqs.weight` tensor, handled by the params, not here.)"""

    kind: str = "none"
    factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    """LLaMA-family decoder hyper-parameters (`{arch}.*` GGUF keys)."""

    vocab_size: int
    context_length: int
    dim: int  # embedding_length
    ffn_dim: int  # feed_forward_length
    n_layers: int  # block_count
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rope_dim: int  # rotated dims per head (rope.dimension_count), <= head_dim
    rope_base: float
    rms_eps: float
    rope_scaling: RopeScaling = RopeScaling()
    tied_output: bool = True  # no `output.weight`: logits use `token_embd`
    has_rope_freqs: bool = False  # `rope_freqs.weight` present (llama3.1-style frequency factors)

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_metadata(cls, md: dict[str, Any], tensor_names: set[str], file_name: str = "model") -> TextConfig:
        arch = md.get("general.architecture")
        if arch not in TEXT_ARCHITECTURES:
            if arch == "clip":
                raise LlavaError(f"{file_name} is an mmproj (clip) file; pass it with --mmproj and give the language model with -m")
            raise LlavaError(f"{file_name}: unsupported architecture {arch!r} (supported: {', '.join(TEXT_ARCHITECTURES)})")

        def key(name: str, default: Any = None) -> Any:
            value = md.get(f"{arch}.{name}", default)
            if value is None:
                raise LlavaError(f"{file_name}: missing required metadata key '{arch}.{name}'")
            return value

        dim = int(key("embedding_length"))
        n_heads = int(key("attention.head_count"))
        n_kv = key("attention.head_count_kv", n_heads)
        if isinstance(n_kv, list):  # per-layer head counts: only uniform ones are supported
            if len(set(n_kv)) != 1:
                raise LlavaError(f"{file_name}: per-layer KV head counts are not supported")
            n_kv = n_kv[0]
        n_kv = int(n_kv)
        head_dim = int(md.get(f"{arch}.attention.key_length", dim // n_heads))
        vocab = md.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = md.get("tokenizer.ggml.tokens")
            if tokens is None:
                raise LlavaError(f"{file_name}: cannot tell the vocabulary size ('{arch}.vocab_size' and tokens missing)")
            vocab = len(tokens)
        scaling_type = md.get(f"{arch}.rope.scaling.type", "none")
        if scaling_type not in ("none", "linear"):
            raise LlavaError(f"{file_name}: rope scaling {scaling_type!r} is not supported (supported: none, linear)")
        factor = float(md.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
        if n_heads % n_kv:
            raise LlavaError(f"{file_name}: head_count {n_heads} is not a multiple of head_count_kv {n_kv}")
        return cls(
            vocab_size=int(vocab),
            context_length=int(key("context_length")),
            dim=dim,
            ffn_dim=int(key("feed_forward_length")),
            n_layers=int(key("block_count")),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rope_dim=int(md.get(f"{arch}.rope.dimension_count", head_dim)),
            rope_base=float(md.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_eps=float(key("attention.layer_norm_rms_epsilon")),
            rope_scaling=RopeScaling(scaling_type, factor if scaling_type == "linear" else 1.0),
            tied_output="output.weight" not in tensor_names,
            has_rope_freqs="rope_freqs.weight" in tensor_names,
        )

    def expected_tensors(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name → numpy-order shape, for every tensor the decoder reads."""
        d, q, kv, f = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.ffn_dim
        shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (self.vocab_size, d), "output_norm.weight": (d,)}
        if not self.tied_output:
            shapes["output.weight"] = (self.vocab_size, d)
        if self.has_rope_freqs:
            shapes["rope_freqs.weight"] = (self.rope_dim // 2,)
        for i in range(self.n_layers):
            p = f"blk.{i}."
            shapes |= {
                p + "attn_norm.weight": (d,),
                p + "attn_q.weight": (q, d),
                p + "attn_k.weight": (kv, d),
                p + "attn_v.weight": (kv, d),
                p + "attn_output.weight": (d, q),
                p + "ffn_norm.weight": (d,),
                p + "ffn_gate.weight": (f, d),
                p + "ffn_up.weight": (f, d),
                p + "ffn_down.weight": (d, f),
            }
        return shapes
