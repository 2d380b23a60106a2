"""CLIP ViT + LLaVA projector as Flax modules, batched over image tiles. Used purely through
`ImageModel(...).apply({"params": params}, pixels)`.

The params pytree mirrors the mmproj GGUF names: `v.blk.3.attn_q.weight` → params["v"]["blk"]["attn_q"]
["weight"][3] (blocks stacked on a leading layer axis and scanned: measured on a CLIP-L/14-336 f16 file,
XLA:CPU compiles the scan in ~1.5 s against ~7 s fully unrolled, and runs it as fast),
`mm.0.weight` → params["mm"]["0"]["weight"]. Weights keep GGUF's `[out, in]` layout. The FFN is stored
canonically here (`ffn_up` = CLIP's fc1, `ffn_down` = fc2) whatever the file's naming.

`compat` selects the graph:
- "llava" (HF / LLaVA): CLS first; hidden state of the deepest stored block (or of each `feature_layer`,
  concatenated); CLS dropped; projector GELU is the exact (erf) one.
- "llama.cpp" (its mtmd graph, bugs included): CLS appended after the patches and position rows given in
  that order; only `n_layers - 1` stored blocks run when there is no `feature_layer` key; `post_ln` applied
  when present; rows 1..n_patches kept (drops patch 0, keeps CLS); tanh-GELU in the projector. With
  `Fp16Rounding` it also rounds where ggml's CPU kernels do: inputs of matmuls whose weight is stored f16
  (the im2col of the patch conv included), and GELU / quick-GELU through their fp16 lookup tables.

Norms, softmax and the f16 emulation run in f32; matmuls in the module's compute dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.config import VisionConfig
from llava_jax.images import ImageLayout, PreparedImage, check_compat, image_layout, preprocess
from llava_jax.mmproj import MMProj, check_text_width, load_mmproj
from llava_jax.sharding import make_mesh, sharding_for

Array = jax.Array


@dataclass(frozen=True)
class Fp16Rounding:
    """Where llama.cpp's CPU graph rounds activations through fp16 (compat mode only).

    f16_weights: GGUF names (relative to the module, e.g. "patch_embd", "blk.attn_q", "mm.0") of matmul
    weights stored as F16: ggml converts the other operand to f16 before those dot products.
    gelu_tables: GELU / quick-GELU evaluated as f16(act(f16(x))), as ggml's lookup tables do.
    """

    f16_weights: frozenset[str] = frozenset()
    gelu_tables: bool = True


def _precision(dtype):
    # f32 must be true f32 (GPUs default to TF32 for f32 dots); lower dtypes use the default.
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _f16(x: Array) -> Array:
    return x.astype(jnp.float16).astype(jnp.float32)


def quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


def activation(x: Array, kind: str, rounding: Fp16Rounding | None) -> Array:
    """kind: "quick_gelu" | "gelu_erf" | "gelu_tanh". Computed in f32."""
    x = x.astype(jnp.float32)
    tables = rounding is not None and rounding.gelu_tables
    if tables:
        x_in = x
        x = _f16(x)
    if kind == "quick_gelu":
        y = quick_gelu(x)
    elif kind == "gelu_erf":
        y = jax.nn.gelu(x, approximate=False)
    else:
        y = jax.nn.gelu(x, approximate=True)
    if tables:
        y = _f16(y)
        if kind == "gelu_tanh":  # ggml's table is only used for |x| < 10
            y = jnp.where(x_in <= -10.0, 0.0, jnp.where(x_in >= 10.0, x_in, y))
    return y


class Linear(nn.Module):
    """y = x @ W.T + b with W stored `[out, in]` as in GGUF."""

    features: int
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = True
    round_input: bool = False  # llama.cpp compat: this weight is stored f16

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = self.param("weight", nn.initializers.normal(0.02), (self.features, x.shape[-1]), self.dtype)
        if self.round_input:
            x = _f16(x)
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), w, precision=_precision(self.dtype),
                       preferred_element_type=jnp.float32)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return y


class LayerNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., D] → f32 [..., D]."""
        d = x.shape[-1]
        w = self.param("weight", nn.initializers.ones, (d,), jnp.float32)
        b = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        x = x.astype(jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * w + b


class VisionBlock(nn.Module):
    """Pre-LN CLIP encoder layer: x + attn(ln1(x)), then + fc2(act(fc1(ln2(x))))."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    compat: str = "llava"
    rounding: Fp16Rounding | None = None
    collect: bool = False  # also return the output as the scan's per-layer output

    def _linear(self, name: str, features: int) -> Linear:
        rounded = self.rounding is not None and f"blk.{name}" in self.rounding.f16_weights
        return Linear(features, self.dtype, round_input=rounded, name=name)

    @nn.compact
    def __call__(self, x: Array, _=None) -> tuple[Array, Array | None]:
        """x: f32 [N, T, D] → (f32 [N, T, D], the same again if `collect`, for the scan's stacked output)."""
        cfg = self.cfg
        n, t, d = x.shape
        h = LayerNorm(cfg.norm_eps, name="ln1")(x)
        q, k, v = (self._linear(name, d)(h).reshape(n, t, cfg.n_heads, cfg.head_dim)
                   for name in ("attn_q", "attn_k", "attn_v"))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q.astype(self.dtype), k.astype(self.dtype),
                            precision=_precision(self.dtype), preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores * (1.0 / cfg.head_dim**0.5), axis=-1)
        attn = jnp.einsum("nhqk,nkhd->nqhd", probs.astype(self.dtype), v.astype(self.dtype),
                          precision=_precision(self.dtype), preferred_element_type=jnp.float32)
        x = x + self._linear("attn_out", d)(attn.reshape(n, t, d))
        h = LayerNorm(cfg.norm_eps, name="ln2")(x)
        h = self._linear("ffn_up", cfg.ffn_dim)(h)
        if cfg.use_gelu:
            kind = "gelu_tanh" if self.compat == "llama.cpp" else "gelu_erf"
        else:
            kind = "quick_gelu"
        h = activation(h, kind, self.rounding)
        x = x + self._linear("ffn_down", d)(h)
        return x, (x if self.collect else None)


class PatchEmbedding(nn.Module):
    """The stride-p patch conv as one matmul: pixels `[N, C, S, S]` → `[N, (S/p)², D]`."""

    dim: int
    patch_size: int
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    round_input: bool = False  # llama.cpp compat: its im2col rounds pixels to the f16 kernel's type

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        n, c, s, _ = pixels.shape
        p, g, d = self.patch_size, s // self.patch_size, self.dim
        w = self.param("weight", nn.initializers.normal(0.02), (d, c, p, p), self.dtype)
        # [N, g*g, C*p*p] in (channel, row, col) order, the kernel's own layout
        patches = pixels.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        if self.round_input:
            patches = _f16(patches)
        x = jnp.einsum("npk,dk->npd", patches.astype(self.dtype), w.reshape(d, -1), precision=_precision(self.dtype),
                       preferred_element_type=jnp.float32)
        if self.use_bias:
            x = x + self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
        return x


class PositionEmbedding(nn.Module):
    n_positions: int
    dim: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x + self.param("weight", nn.initializers.normal(0.02), (self.n_positions, self.dim), jnp.float32)


class VisionTower(nn.Module):
    """Pixels `[N, 3, S, S]` → selected CLIP features `[N, n_patches, D × n_feature_layers]` (f32).

    `unroll`: blocks per scan iteration (1 = a rolled loop; `True` = fully unrolled, same params)."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    compat: str = "llava"
    rounding: Fp16Rounding | None = None
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        cfg, llamacpp = self.cfg, self.compat == "llama.cpp"
        n, d = pixels.shape[0], cfg.dim
        rounded = self.rounding is not None and "patch_embd" in self.rounding.f16_weights
        x = PatchEmbedding(d, cfg.patch_size, cfg.has_patch_bias, self.dtype, rounded, name="patch_embd")(pixels)
        if cfg.has_class_embd:
            cls = jnp.broadcast_to(self.param("class_embd", nn.initializers.normal(1.0), (d,), jnp.float32), (n, 1, d))
            x = jnp.concatenate([x, cls] if llamacpp else [cls, x], axis=1)
        x = PositionEmbedding(cfg.n_positions, d, name="position_embd")(x)
        if cfg.has_pre_ln:
            x = LayerNorm(cfg.norm_eps, name="pre_ln")(x)

        n_run = cfg.blocks_to_run(self.compat)
        keep = cfg.feature_layers or (n_run,)
        if llamacpp:  # llama.cpp stacks the feature layers in depth order
            keep = tuple(sorted(set(keep)))
        states = {0: x}
        if n_run > 0:
            collect = any(0 < i < n_run for i in keep)
            scan = nn.scan(VisionBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=n_run,
                           unroll=self.unroll)
            x, ys = scan(cfg, self.dtype, self.compat, self.rounding, collect, name="blk")(x, None)
            states |= {i: ys[i - 1] for i in keep if 0 < i < n_run}
            states[n_run] = x
        if cfg.has_post_ln and llamacpp:  # llama.cpp normalises the last state (LLaVA never does)
            states[n_run] = LayerNorm(cfg.norm_eps, name="post_ln")(states[n_run])
        feats = jnp.concatenate([states[i] for i in keep], axis=-1) if len(keep) > 1 else states[keep[0]]
        if not cfg.has_class_embd:
            return feats
        return feats[:, 1:cfg.n_patches + 1]  # llava: drops CLS; llama.cpp: drops patch 0, keeps CLS


class Projector(nn.Module):
    """LLaVA projector: `mlp` = Linear, GELU, Linear; `mlp_norm` (Yi-VL) = Linear, LN, GELU, Linear, LN."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    compat: str = "llava"
    rounding: Fp16Rounding | None = None

    def _linear(self, idx: str, features: int) -> Linear:
        rounded = self.rounding is not None and f"mm.{idx}" in self.rounding.f16_weights
        return Linear(features, self.dtype, round_input=rounded, name=idx)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.cfg
        kind = "gelu_tanh" if self.compat == "llama.cpp" else "gelu_erf"
        x = self._linear("0", cfg.proj_hidden)(x)
        if cfg.projector == "mlp_norm":
            x = LayerNorm(cfg.norm_eps, name="1")(x)
            x = activation(x, kind, self.rounding)
            return LayerNorm(cfg.norm_eps, name="4")(self._linear("3", cfg.out_dim)(x))
        x = activation(x, kind, self.rounding)
        return self._linear("2", cfg.out_dim)(x)


class ImageModel(nn.Module):
    """Pixels `[N, 3, S, S]` → projected image features `[N, n_patches, out_dim]` (f32)."""

    cfg: VisionConfig
    dtype: jnp.dtype = jnp.float32
    compat: str = "llava"
    rounding: Fp16Rounding | None = None
    unroll: int | bool = 1

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        feats = VisionTower(self.cfg, self.dtype, self.compat, self.rounding, self.unroll, name="v")(pixels)
        return Projector(self.cfg, self.dtype, self.compat, self.rounding, name="mm")(feats)


def pack_image_features(features: Array, layout: ImageLayout, newline: Array | None) -> Array:
    """One image's tile features `[n_tiles, P, D]` → its token embeddings `[layout.n_tokens, D]`.

    single / separate / flat: the tiles' features in order. spatial: base tile, then the tile grid as one
    row-major feature map. spatial_unpad: base tile, then the map cropped to the picture's aspect with
    `newline` after every row (LLaVA-1.6).
    """
    n_tiles, n_feat, dim = features.shape
    if layout.merge in ("single", "separate", "flat"):
        return features.reshape(n_tiles * n_feat, dim)
    side = int(round(n_feat**0.5))
    rows, cols = layout.grid
    grid = features[1:].reshape(rows, cols, side, side, dim).transpose(0, 2, 1, 3, 4)
    grid = grid.reshape(rows * side, cols * side, dim)
    if layout.merge == "spatial":
        return jnp.concatenate([features[0], grid.reshape(-1, dim)])
    top, bottom, left, right = layout.crop
    grid = grid[top:rows * side - bottom, left:cols * side - right]
    nl = jnp.broadcast_to(newline.astype(grid.dtype), (grid.shape[0], 1, dim))
    return jnp.concatenate([features[0], jnp.concatenate([grid, nl], axis=1).reshape(-1, dim)])


# ---------------------------------------------------------------------------------------------
# ImageEncoder: file → images → token embeddings


@lru_cache(maxsize=16)
def _jitted_forward(cfg: VisionConfig, dtype, compat: str, rounding: Fp16Rounding | None):
    """One jitted `ImageModel.apply` per graph (shared by encoders of the same config)."""
    model = ImageModel(cfg, dtype, compat, rounding)
    return jax.jit(lambda params, pixels: model.apply({"params": params}, pixels))


_jitted_pack = jax.jit(pack_image_features, static_argnums=1)


class ImageEncoder:
    """An mmproj file ready to turn images into token embeddings for the language model.

    `embed(images)` preprocesses every image, runs *all tiles of all images in one batched call* of the
    jitted ViT + projector, then packs each image's tiles into its tokens (unpad + newline for 1.6).
    Compiles once per total tile count.
    """

    def __init__(self, mmproj: MMProj, compat: str = "llava", dtype=jnp.float32, mesh=None, rounding: bool = True):
        check_compat(compat)
        if mmproj.compat is not None and mmproj.compat != compat:
            raise ValueError(f"mmproj loaded for compat={mmproj.compat!r}, encoder asked for {compat!r}")
        self.cfg: VisionConfig = mmproj.cfg
        self.params = mmproj.params
        self.newline = mmproj.newline
        self.name = mmproj.name
        self.f16_weights = mmproj.f16_weights
        self.source_metadata = mmproj.metadata  # what rebuilds `cfg` (checkpointing)
        self.source_shapes = mmproj.tensor_shapes
        self.compat = compat
        self.dtype = jnp.dtype(dtype)
        self.mesh = make_mesh() if mesh is None else mesh
        fp16 = Fp16Rounding(mmproj.f16_weights) if compat == "llama.cpp" and rounding else None
        self.model = ImageModel(self.cfg, self.dtype, compat, fp16)
        self._forward = _jitted_forward(self.cfg, self.dtype, compat, fp16)

    @classmethod
    def from_gguf(cls, path, mesh=None, dtype=None, compat: str = "llava", text_dim: int | None = None,
                  rounding: bool = True) -> ImageEncoder:
        """Load an mmproj GGUF. dtype None: f32 on CPU and in llama.cpp compat mode, else bf16.
        `text_dim` given: LlavaError when the projector's output width differs. `rounding` (compat mode
        only): emulate llama.cpp's fp16 roundings (f16-weight matmul inputs, GELU tables)."""
        check_compat(compat)
        if dtype is None:
            on_cpu = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform == "cpu"
            dtype = jnp.float32 if on_cpu or compat == "llama.cpp" else jnp.bfloat16
        mmproj = load_mmproj(path, mesh, dtype, compat)
        if text_dim is not None:
            check_text_width(mmproj.name, mmproj.cfg.out_dim, text_dim)
        return cls(mmproj, compat, dtype, mesh, rounding)

    @property
    def out_dim(self) -> int:
        return self.cfg.out_dim

    def layout(self, image_size: tuple[int, int]) -> ImageLayout:
        return image_layout(tuple(image_size), self.cfg, self.compat)

    def n_tokens(self, image_size: tuple[int, int]) -> int:
        """(w, h) → number of image tokens, without running the ViT."""
        return self.layout(image_size).n_tokens

    def preprocess(self, image) -> PreparedImage:
        """PIL image (or path / uint8 array) → `images.PreparedImage` (pixel tiles `[n, 3, S, S]` + layout)."""
        return preprocess(image, self.cfg, self.compat)

    def encode_tiles(self, pixels) -> Array:
        """float32 `[N, 3, S, S]` tiles → projected features `[N, n_patches, out_dim]` (f32), one jitted call."""
        pixels = jnp.asarray(pixels, jnp.float32) if not isinstance(pixels, jax.Array) else pixels
        axes = ("batch", None, None, None)
        pixels = jax.device_put(pixels, sharding_for(pixels.shape, axes, self.mesh))
        return self._forward(self.params, pixels)

    def embed(self, images: list) -> list[Array]:
        """PIL images (or paths) → one f32 `[n_tokens_i, out_dim]` array per image."""
        prepared = [self.preprocess(img) for img in images]
        if not prepared:
            return []
        feats = self.encode_tiles(np.concatenate([p.pixels for p in prepared]))
        out, start = [], 0
        for p in prepared:
            n = p.layout.n_tiles
            out.append(_jitted_pack(feats[start:start + n], p.layout, self.newline))
            start += n
        return out
