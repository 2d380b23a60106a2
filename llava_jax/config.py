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
                raise LlavaError(f"{file_name} is an mmproj (clip) file: pass it with --mmproj, the language model with -m")
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
        """GGUF tensor name → numpy-order shape, for every tensor the decoder reads (`weights.TEXT_WEIGHTS`)."""
        from llava_jax.weights import expected_tensors

        return expected_tensors(self)


# ---------------------------------------------------------------------------------------------
# VisionConfig: the CLIP tower + projector of an mmproj (`general.architecture = clip`) file

VISION_PROJECTORS = ("mlp", "mlp_norm")
PATCH_MERGE_TYPES = ("flat", "spatial", "spatial_unpad")


@dataclass(frozen=True)
class VisionConfig:
    """CLIP ViT + LLaVA projector hyper-parameters (`clip.*` GGUF keys plus what the tensor shapes say).

    Widths come from the shapes where the metadata cannot be trusted: `proj_hidden` / `out_dim` are the
    projector's `mm.0` / last-linear output rows (`clip.vision.projection_dim` is CLIP's own 768-wide
    projection, unused by LLaVA). `ffn_swapped` marks the legacy converter's naming (CLIP's fc1 stored as
    `ffn_down`, fc2 as `ffn_up`), detected by shape.
    """

    image_size: int  # tile side in pixels (336)
    patch_size: int  # 14
    dim: int  # embedding_length
    ffn_dim: int  # feed_forward_length
    n_layers: int  # stored blocks (block_count)
    n_heads: int
    norm_eps: float
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    projector: str  # "mlp" | "mlp_norm"
    proj_in: int  # mm.0 input width (dim × number of feature layers)
    proj_hidden: int  # mm.0 output width
    out_dim: int  # projector output width (= the language model's width)
    use_gelu: bool = False  # FFN activation: GELU when true, else quick-GELU (CLIP-L)
    feature_layers: tuple[int, ...] = ()  # hidden-state indices (0 = after pre_ln); () = the deepest stored block
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # (w, h) candidates; non-empty = LLaVA-1.6 anyres
    patch_merge: str = "flat"  # how anyres tiles become tokens: flat | spatial | spatial_unpad
    has_class_embd: bool = True
    has_patch_bias: bool = False
    has_pre_ln: bool = True
    has_post_ln: bool = False
    has_newline: bool = False  # model.image_newline / v.image_newline present
    ffn_swapped: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def n_patches(self) -> int:
        return self.patches_per_side**2

    @property
    def n_positions(self) -> int:
        return self.n_patches + int(self.has_class_embd)

    @property
    def is_anyres(self) -> bool:
        return bool(self.grid_pinpoints)

    def blocks_to_run(self, compat: str = "llava") -> int:
        """Stored blocks the graph runs: up to the deepest feature layer, else every stored block (LLaVA:
        converters already dropped CLIP's last layer for select-layer -2) or all but one (llama.cpp's graph)."""
        if self.feature_layers:
            return max(self.feature_layers)
        return self.n_layers - 1 if compat == "llama.cpp" else self.n_layers

    @classmethod
    def from_metadata(cls, md: dict[str, Any], tensor_names: Any, file_name: str = "mmproj") -> VisionConfig:
        """Build from an mmproj file's metadata and its tensors.

        `tensor_names`: a mapping GGUF tensor name → numpy-order shape (the shapes decide the projector
        widths and the legacy FFN naming). Raises LlavaError (one line) for anything missing or unsupported.
        """
        shapes = {name: tuple(int(d) for d in shape) for name, shape in dict(tensor_names).items()}
        arch = md.get("general.architecture")
        if arch != "clip":
            if arch in TEXT_ARCHITECTURES:
                raise LlavaError(f"{file_name} is a language model ({arch}), not an mmproj (clip) file; give it with -m")
            raise LlavaError(f"{file_name}: not an mmproj file (general.architecture = {arch!r}, expected 'clip')")
        if md.get("clip.has_vision_encoder") is False:
            raise LlavaError(f"{file_name}: mmproj has no vision encoder (clip.has_vision_encoder = false)")

        def key(name: str) -> Any:
            value = md.get(f"clip.vision.{name}")
            if value is None:
                raise LlavaError(f"{file_name}: missing required metadata key 'clip.vision.{name}'")
            return value

        def need(name: str) -> tuple[int, ...]:
            if name not in shapes:
                raise LlavaError(f"{file_name}: missing tensor {name}")
            return shapes[name]

        dim, ffn, n_layers = int(key("embedding_length")), int(key("feed_forward_length")), int(key("block_count"))
        n_heads, eps = int(key("attention.head_count")), float(key("attention.layer_norm_epsilon"))
        image_size, patch_size = int(key("image_size")), int(key("patch_size"))
        if n_heads <= 0 or dim % n_heads:
            raise LlavaError(f"{file_name}: embedding_length {dim} is not a multiple of head_count {n_heads}")
        if patch_size <= 0 or image_size % patch_size:
            raise LlavaError(f"{file_name}: image_size {image_size} is not a multiple of patch_size {patch_size}")
        mean = tuple(float(x) for x in md.get("clip.vision.image_mean", (0.48145466, 0.4578275, 0.40821073)))
        std = tuple(float(x) for x in md.get("clip.vision.image_std", (0.26862954, 0.26130258, 0.27577711)))
        if len(mean) != 3 or len(std) != 3:
            raise LlavaError(f"{file_name}: image_mean / image_std must have 3 values, got {len(mean)} and {len(std)}")

        projector = md.get("clip.projector_type", md.get("clip.vision.projector_type"))
        has_norm_proj = "mm.3.weight" in shapes or "mm.4.weight" in shapes
        if projector is None:  # old files (BakLLaVA, ShareGPT4V, Yi-VL, ...): no projector type at all
            if not md.get("clip.has_llava_projector", False):
                raise LlavaError(f"{file_name}: no 'clip.projector_type' and no LLaVA projector (clip.has_llava_projector)")
            projector = "mlp"
        if projector == "mlp" and has_norm_proj:
            projector = "mlp_norm"  # Yi-VL style: Linear, LayerNorm, GELU, Linear, LayerNorm
        if projector not in VISION_PROJECTORS:
            raise LlavaError(f"{file_name}: projector type {projector!r} is not supported (supported: "
                             f"{', '.join(VISION_PROJECTORS)})")
        mm0 = need("mm.0.weight")
        last = need("mm.3.weight" if projector == "mlp_norm" else "mm.2.weight")
        if len(mm0) != 2 or len(last) != 2:
            raise LlavaError(f"{file_name}: projector weights must be matrices, got {list(mm0)} and {list(last)}")

        feature_layers = md.get("clip.vision.feature_layer")
        if feature_layers is None:
            feature_layers = ()
        elif isinstance(feature_layers, int):
            feature_layers = (feature_layers,)
        feature_layers = tuple(int(x) for x in feature_layers)
        for layer in feature_layers:
            if not 0 <= layer <= n_layers:
                raise LlavaError(f"{file_name}: clip.vision.feature_layer {layer} is outside 0..{n_layers} "
                                 f"(the file stores {n_layers} blocks)")

        flat = [int(x) for x in md.get("clip.vision.image_grid_pinpoints", None) or ()]
        if len(flat) % 2:
            raise LlavaError(f"{file_name}: clip.vision.image_grid_pinpoints has an odd number of values ({len(flat)})")
        pinpoints = tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))
        for w, h in pinpoints:
            if w <= 0 or h <= 0 or w % image_size or h % image_size:
                raise LlavaError(f"{file_name}: grid pinpoint {w}x{h} is not a multiple of the image size {image_size}")

        has_newline = "model.image_newline" in shapes or "v.image_newline" in shapes
        merge = md.get("clip.vision.mm_patch_merge_type") or ("spatial_unpad" if has_newline else "flat")
        if merge not in PATCH_MERGE_TYPES:
            raise LlavaError(f"{file_name}: mm_patch_merge_type {merge!r} is not supported (supported: "
                             f"{', '.join(PATCH_MERGE_TYPES)})")
        if pinpoints and "unpad" in merge and not has_newline:
            raise LlavaError(f"{file_name}: mm_patch_merge_type {merge} needs the tensor model.image_newline")

        up, down = shapes.get("v.blk.0.ffn_up.weight"), shapes.get("v.blk.0.ffn_down.weight")
        # Legacy converter: fc1 ([ffn, dim]) stored as ffn_down. Only decidable when ffn != dim.
        ffn_swapped = up == (dim, ffn) and down == (ffn, dim) and ffn != dim
        return cls(
            image_size=image_size,
            patch_size=patch_size,
            dim=dim,
            ffn_dim=ffn,
            n_layers=n_layers,
            n_heads=n_heads,
            norm_eps=eps,
            image_mean=mean,  # type: ignore[arg-type]
            image_std=std,  # type: ignore[arg-type]
            projector=projector,
            proj_in=mm0[1],
            proj_hidden=mm0[0],
            out_dim=last[0],
            use_gelu=bool(md.get("clip.use_gelu", False)),
            feature_layers=feature_layers,
            grid_pinpoints=pinpoints,
            patch_merge=merge,
            has_class_embd="v.class_embd" in shapes,
            has_patch_bias="v.patch_embd.bias" in shapes,
            has_pre_ln="v.pre_ln.weight" in shapes or "v.pre_ln.bias" in shapes,  # optional, but both or none
            has_post_ln="v.post_ln.weight" in shapes or "v.post_ln.bias" in shapes,
            has_newline=has_newline,
            ffn_swapped=ffn_swapped,
        )

    def expected_tensors(self, newline_name: str = "model.image_newline") -> dict[str, tuple[int, ...]]:
        """GGUF tensor name → numpy-order shape for every tensor the encoder reads (FFN names as stored)."""
        d, f, p = self.dim, self.ffn_dim, self.patch_size
        shapes: dict[str, tuple[int, ...]] = {
            "v.patch_embd.weight": (d, 3, p, p),
            "v.position_embd.weight": (self.n_positions, d),
        }
        if self.has_patch_bias:
            shapes["v.patch_embd.bias"] = (d,)
        if self.has_class_embd:
            shapes["v.class_embd"] = (d,)
        for norm, present in (("v.pre_ln", self.has_pre_ln), ("v.post_ln", self.has_post_ln)):
            if present:
                shapes |= {f"{norm}.weight": (d,), f"{norm}.bias": (d,)}
        fc1, fc2 = ("ffn_down", "ffn_up") if self.ffn_swapped else ("ffn_up", "ffn_down")
        for i in range(self.n_layers):
            b = f"v.blk.{i}."
            for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
                shapes |= {b + name + ".weight": (d, d), b + name + ".bias": (d,)}
            for name in ("ln1", "ln2"):
                shapes |= {b + name + ".weight": (d,), b + name + ".bias": (d,)}
            shapes |= {b + fc1 + ".weight": (f, d), b + fc1 + ".bias": (f,),
                       b + fc2 + ".weight": (d, f), b + fc2 + ".bias": (d,)}
        h, o = self.proj_hidden, self.out_dim
        shapes |= {"mm.0.weight": (h, self.proj_in), "mm.0.bias": (h,)}
        if self.projector == "mlp":
            shapes |= {"mm.2.weight": (o, h), "mm.2.bias": (o,)}
        else:
            shapes |= {"mm.1.weight": (h,), "mm.1.bias": (h,), "mm.3.weight": (o, h), "mm.3.bias": (o,),
                       "mm.4.weight": (o,), "mm.4.bias": (o,)}
        if self.has_newline:
            shapes[newline_name] = (o,)
        return shapes
