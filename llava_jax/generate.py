"""Prefill + chunked `lax.scan` decoding over a (possibly ragged) batch of prompts.

Layout: every row is *left*-padded to a common bucketed length Tb, so all rows write the same cache
column at each step (one `dynamic_update_slice`, no per-row scatter); `kv_start[b]` masks row b's
padding and its RoPE positions count from its first real token. A single prompt is a batch of one.

Flow: one jitted prefill writes the prompt (text tokens and image embeddings merged at placeholder
positions) into a preallocated, donated KV cache and returns the last position's logits; the first
token is sampled from them; then `decode_chunk` runs `chunk` steps inside one jitted `lax.scan`
(sampling included, PRNG key and recent-token window in the carry), so the host syncs once per chunk
to stream text and check EOS / stop strings / limits.

Shapes are bucketed (prompt length, cache length, attention window) so a long session compiles a
handful of programs; compilation is done ahead of time and timed separately from evaluation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax import cpu_kernels
from llava_jax.config import TextConfig
from llava_jax.errors import LlavaError
from llava_jax.params import fuse_projections as fuse
from llava_jax.params import fused_groups, split_projections
from llava_jax.sampling import SamplingParams, init_recent, push_recent, sample_next
from llava_jax.sharding import KV_CACHE_AXES, ShardingRules, sharding_for
from llava_jax.text import Decoder, KVCache, per_layer_axes, per_layer_shapes

IMAGE_PLACEHOLDER = -1  # token id marking an image-embedding row in a prompt


def bucket(n: int, minimum: int = 32, linear_from: int = 256) -> int:
    """Round n up to a power of two (>= minimum), or to a multiple of linear_from above it."""
    if n <= minimum:
        return minimum
    if n <= linear_from:
        return 1 << (n - 1).bit_length()
    return -(-n // linear_from) * linear_from


@dataclass(frozen=True)
class Buckets:
    """The shape buckets a session compiles for (each distinct shape is one more XLA compile).

    Prompt lengths round up to a power of two >= `minimum`, and above `prompt_step` to a multiple of it
    (`prompt(n)`); KV-cache lengths and attention windows to a power of two, above `step` to a multiple
    of `step`, with at least 256 columns (`__call__`). Smaller buckets waste less padding and compile more
    programs. A padded prompt row costs a real row's compute (LLaVA-1.5's 595-token image prompt: 640
    rows at prompt_step 64, 768 at 256), while a longer cache costs only memory, hence the finer prompt
    step. All are powers of two, minimum <= step.
    """

    minimum: int = 32
    step: int = 256
    prompt_step: int = 64

    def __post_init__(self):
        for name, v in (("minimum", self.minimum), ("step", self.step), ("prompt step", self.prompt_step)):
            if v < 1 or v & (v - 1):
                raise LlavaError(f"bucket {name} must be a power of two >= 1, got {v}")
        if self.minimum > self.step:
            raise LlavaError(f"bucket minimum {self.minimum} is larger than the bucket step {self.step}")

    def __call__(self, n: int, minimum: int | None = None) -> int:
        return bucket(n, self.minimum if minimum is None else minimum, self.step)

    def prompt(self, n: int) -> int:
        """The compiled row count of an n-token prompt."""
        return bucket(n, self.minimum, self.prompt_step)


def pad_image_rows(rows: Sequence[np.ndarray | None], dim: int) -> np.ndarray | None:
    """Per-request image embedding rows [N_i, D] (or None) → f32 [B, N, D], N the largest N_i rounded up
    to a power of two >= 64 (few compiled shapes across image counts); None when no request has any."""
    longest = max((0 if r is None else len(r)) for r in rows)
    if not longest:
        return None
    out = np.zeros((len(rows), bucket(longest, minimum=64), dim), np.float32)
    for i, r in enumerate(rows):
        if r is not None:
            out[i, : len(r)] = r
    return out


KERNEL_NEEDS = "need one CPU device, f32 compute and unrolled layers"  # see `decode_kernel_applies`


def decode_kernel_applies(mesh, dtype, scan_layers: bool) -> bool:
    """Whether the native decode kernels (`cpu_kernels`) can serve this engine: one CPU device (the custom
    calls have no partitioning rule), f32 compute, and unrolled layers (attention reads per-layer KV buffers)."""
    return (mesh.size == 1 and mesh.devices.flat[0].platform == "cpu" and jnp.dtype(dtype) == jnp.float32
            and not scan_layers)


@cache
def _zeros(shapes: tuple[tuple[int, ...], ...], dtype, shardings: tuple) -> Callable[[], tuple[jax.Array, ...]]:
    """A jitted maker of zero arrays placed in `shardings` (one per shape/dtype/placement: new caches
    of a seen shape cost no trace or compile; a fresh jit per call cost 80-160 ms per generate)."""
    return jax.jit(lambda: tuple(jnp.zeros(s, dtype) for s in shapes), out_shardings=shardings)


@dataclass
class Timings:
    """Seconds and counts of one generate call (compile time kept apart from evaluation)."""

    prompt_tokens: int = 0
    image_tokens: int = 0
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generate_s: float = 0.0
    compile_s: float = 0.0
    image_s: float = 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s else 0.0

    def as_dict(self) -> dict:
        return {**self.__dict__, "prompt_tps": self.prompt_tps, "generate_tps": self.generate_tps}


@dataclass
class Request:
    """One row: token ids with IMAGE_PLACEHOLDER where image rows go, and those rows in order."""

    tokens: list[int]
    image_embeds: np.ndarray | None = None  # f32 [n_placeholders, D]
    max_new_tokens: int = 128

    def __post_init__(self):
        n_slots = sum(t == IMAGE_PLACEHOLDER for t in self.tokens)
        n_rows = 0 if self.image_embeds is None else len(self.image_embeds)
        if n_slots != n_rows:
            raise ValueError(f"{n_slots} image placeholders but {n_rows} image embedding rows")


@dataclass
class StepOutput:
    """New tokens of one host sync: per row, the ids emitted since the last sync (possibly empty).

    `finished` is the engine's live list: a consumer may set `finished[i] = True` (e.g. on a stop
    string) to end row i; the loop ends when every row is finished.
    """

    tokens: list[list[int]]
    finished: list[bool]
    timings: Timings = field(default_factory=Timings)


class TextEngine:
    """Jitted prefill / decode over one decoder's params on one mesh."""

    def __init__(self, cfg: TextConfig, params: dict, mesh, dtype, scan_layers: bool = False,
                 rules: ShardingRules = ShardingRules(), chunk: int = 16, fuse_projections: bool | None = None,
                 buckets: Buckets = Buckets(), decode_kernel: bool | None = None, kv_dtype=None):
        """params: from `params.load_text_params`, in any layout it builds (fused or not, plain arrays or
        `QTensor` blocks). fuse_projections (default: when the mesh's `model` axis has one device) fuses
        plain GGUF-named q/k/v and gate/up weights still apart (`params.fuse_projections`; load fuses at
        load time already); `canonical_params()` gives the GGUF-named layout back. decode_kernel
        (default: where they apply and build, see `decode_kernel_applies`) runs decode steps' attention
        and weight products through the native kernels (`cpu_kernels`) instead of XLA's dots. kv_dtype:
        the KV cache's dtype (default: the compute dtype; f16 halves it, as llama.cpp's `-ctk/-ctv f16`)."""
        self.cfg, self.mesh, self.dtype, self.rules, self.chunk, self.buckets = cfg, mesh, dtype, rules, chunk, buckets
        self.kv_dtype = jnp.dtype(kv_dtype if kv_dtype is not None else dtype)
        if fuse_projections is None:
            fuse_projections = mesh.shape["model"] == 1
        self.params = fuse(params, mesh, rules) if fuse_projections else params
        # Which decode path runs, and why (the CLI reports it).
        applies = decode_kernel_applies(mesh, dtype, scan_layers)
        if decode_kernel is False:
            self.decode_kernels = "xla (kernels not requested)"
        elif not applies:
            if decode_kernel:
                raise LlavaError(f"the decode kernels {KERNEL_NEEDS}")
            self.decode_kernels = f"xla (the kernels {KERNEL_NEEDS})"
        elif not cpu_kernels.kernels_available():
            if decode_kernel:
                raise LlavaError(f"the decode kernels are {cpu_kernels.kernel_status()}")
            self.decode_kernels = f"xla (kernels {cpu_kernels.kernel_status()})"
        else:
            self.decode_kernels = "native"
        decode_kernel = self.decode_kernels == "native"
        self.model = Decoder(cfg, dtype, scan_layers, fused_groups(self.params), decode_kernel)
        self._compiled: dict = {}
        self._forward = jax.jit(self._forward_impl, static_argnames=("kv_window",), donate_argnames=("cache",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("n_steps", "kv_window", "sampling"),
                               donate_argnames=("cache",))
        self._first = jax.jit(self._first_impl, static_argnames=("sampling",))
        self._grow = jax.jit(self._grow_impl, static_argnames=("length",), donate_argnames=("cache",))
        # Generation keeps one KV buffer per layer when layers are unrolled (decode reads each whole: no
        # window copies, see text.KVCache); scanned layers need the stacked layout.
        self.per_layer_cache = not scan_layers

    def canonical_params(self) -> dict:
        """The params in GGUF-named layout (q/k/v and gate/up apart), e.g. for a checkpoint."""
        if not self.model.fused_projections:
            return self.params
        return split_projections(self.params, self.cfg, self.mesh, self.rules)

    # ---- jitted bodies ----------------------------------------------------------------------------
    def _forward_impl(self, params, tokens, positions, cache, write_index, kv_start, image_embeds, logit_index, *,
                      kv_window):
        return self.model.apply({"params": params}, tokens, positions, cache, write_index, kv_start, kv_window,
                                image_embeds=image_embeds, logit_index=logit_index)

    @staticmethod
    def _first_impl(logits, key, recent, *, sampling):
        """Sample the first token from the prefill logits [B, V]."""
        key, sub = jax.random.split(key)
        token = sample_next(logits, sub, sampling, recent)
        return token, key, push_recent(recent, token)

    def _decode_impl(self, params, cache, token, write_index, kv_start, key, recent, *, n_steps, kv_window, sampling):
        """Feed `token` [B] at column write_index, then n_steps sample→feed steps. Returns tokens [B, n_steps]."""

        def step(carry, _):
            cache, token, column, key, recent = carry
            positions = (column - kv_start)[:, None]
            logits, cache = self.model.apply({"params": params}, token[:, None], positions, cache, column, kv_start,
                                             kv_window, logit_index=jnp.zeros_like(kv_start))
            key, sub = jax.random.split(key)
            nxt = sample_next(logits, sub, sampling, recent)
            return (cache, nxt, column + 1, key, push_recent(recent, nxt)), nxt

        carry, tokens = jax.lax.scan(step, (cache, token, write_index, key, recent), None, length=n_steps)
        cache, _, _, key, recent = carry
        return tokens.T, cache, key, recent

    @staticmethod
    def _grow_impl(cache, *, length):
        """Pad every per-layer K/V buffer with zero columns up to `length` (keys: last axis, values: -2)."""
        def pad(x, axis):
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, length - x.shape[axis])
            return jnp.pad(x, widths)
        return KVCache(tuple(pad(k, -1) for k in cache.k), tuple(pad(v, -2) for v in cache.v))

    def _compile(self, fn, name: str, timings: Timings | None, *args, **static):
        """Ahead-of-time compile fn for these shapes (cached); compile seconds go to timings."""
        sig = (name, tuple(sorted(static.items())),
               tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(args) if hasattr(a, "shape")))
        compiled = self._compiled.get(sig)
        if compiled is None:
            t0 = time.perf_counter()
            compiled = self._compiled[sig] = fn.lower(*args, **static).compile()
            if timings is not None:
                timings.compile_s += time.perf_counter() - t0
        return compiled

    # ---- building blocks ----------------------------------------------------------------------------
    def new_cache(self, batch: int, length: int, per_layer: bool = False) -> KVCache:
        """A zero KV cache for `batch` rows of `length` columns, stacked or per-layer (see text.KVCache)."""
        if per_layer:
            n = self.cfg.n_layers
            (k_shape, v_shape), (k_axes, v_axes) = per_layer_shapes(self.cfg, batch, length), per_layer_axes(
                batch, self.cfg.n_kv_heads)
            k_sharding, v_sharding = (sharding_for(s, a, self.mesh, self.rules) for s, a in ((k_shape, k_axes),
                                                                                             (v_shape, v_axes)))
            buffers = _zeros((k_shape,) * n + (v_shape,) * n, self.kv_dtype, (k_sharding,) * n + (v_sharding,) * n)()
            return KVCache(buffers[:n], buffers[n:])
        shape = (self.cfg.n_layers, batch, length, self.cfg.n_kv_heads, self.cfg.head_dim)
        sharding = sharding_for(shape, (None, *KV_CACHE_AXES), self.mesh, self.rules)
        return KVCache(*_zeros((shape, shape), self.kv_dtype, (sharding, sharding))())

    def _batch_array(self, x: np.ndarray) -> jax.Array:
        axes = ("batch",) + (None,) * (x.ndim - 1)
        return jax.device_put(x, sharding_for(x.shape, axes, self.mesh, self.rules))

    def logits(self, ids: Sequence[int], image_embeds: np.ndarray | None = None) -> np.ndarray:
        """Teacher-forced f32 logits [len(ids), V] for one sequence.

        ids may hold IMAGE_PLACEHOLDER slots, filled in order by the rows of image_embeds [N, D].
        """
        n = len(ids)
        n_slots = sum(t == IMAGE_PLACEHOLDER for t in ids)
        n_rows = 0 if image_embeds is None else len(image_embeds)
        if n_slots != n_rows:
            raise LlavaError(f"{n_slots} image placeholders in the tokens but {n_rows} image embedding rows")
        tb = self.buckets.prompt(n)
        tokens = np.zeros((1, tb), np.int32)
        tokens[0, :n] = ids
        positions = np.arange(tb, dtype=np.int32)[None]
        cache = self.new_cache(1, tb)
        embeds = pad_image_rows([image_embeds], self.cfg.dim)
        args = (self.params, tokens, positions, cache, np.int32(0), np.zeros(1, np.int32), embeds, None)
        out, _ = self._compile(self._forward, "logits", None, *args, kv_window=tb)(*args)
        return np.asarray(out[0, :n])

    # ---- generation ------------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request], sampling: SamplingParams, key: jax.Array, n_ctx: int,
                 stop_ids: frozenset[int] = frozenset()) -> Iterator[StepOutput]:
        """Yield the new tokens of every row at each host sync until all rows finish.

        A row finishes on a stop id (not emitted), at its max_new_tokens, or at the context end.
        """
        timings = Timings()
        sampling = replace(sampling, seed=None)  # the seed only makes `key`: keep it out of the compile cache key
        b = len(requests)
        lengths = [len(r.tokens) for r in requests]
        for r, n in zip(requests, lengths, strict=True):
            if n == 0:
                raise LlavaError("empty prompt: nothing to generate from")
            if n >= n_ctx:
                n_img = sum(t == IMAGE_PLACEHOLDER for t in r.tokens)
                raise LlavaError(f"prompt is {n} tokens ({n - n_img} text + {n_img} image), context is {n_ctx}: "
                                 f"pass a larger -c (at most {self.cfg.context_length})")
        limits = [min(r.max_new_tokens, n_ctx - n) for r, n in zip(requests, lengths, strict=True)]
        tb = self.buckets.prompt(max(lengths))
        total = tb + max(limits) + self.chunk
        cache_len = self.buckets(total, minimum=256)

        tokens = np.zeros((b, tb), np.int32)
        kv_start = np.array([tb - n for n in lengths], np.int32)
        for i, r in enumerate(requests):
            tokens[i, tb - lengths[i]:] = r.tokens
        positions = np.maximum(np.arange(tb, dtype=np.int32)[None] - kv_start[:, None], 0)
        image_embeds = pad_image_rows([r.image_embeds for r in requests], self.cfg.dim)
        if image_embeds is not None:
            image_embeds = self._batch_array(image_embeds)
        timings.prompt_tokens = sum(lengths)
        timings.image_tokens = sum(t == IMAGE_PLACEHOLDER for r in requests for t in r.tokens)
        recent = jnp.asarray(init_recent([[t for t in r.tokens if t >= 0] for r in requests],
                                         sampling.repeat_last_n))

        if self.per_layer_cache:
            # Buffers start at the first decode window and grow window by window (XLA's decode
            # attention reads them whole: ~6 us per column per token for SmolLM2 on the 2-core VM; the
            # kernel reads only the valid columns); the last window is only as long as this request
            # can need (rounded to 256), e.g. 768 rather than 1024 columns for 512 + 128 tokens.
            cache_len = min(cache_len, -(-total // 256) * 256)
            length = min(cache_len, self.buckets(tb + self.chunk, minimum=256))
        else:
            length = cache_len
        cache = self.new_cache(b, length, per_layer=self.per_layer_cache)
        args = (self.params, self._batch_array(tokens), self._batch_array(positions), cache, np.int32(0),
                self._batch_array(kv_start), image_embeds, np.full(b, tb - 1, np.int32))
        prefill = self._compile(self._forward, "prefill", timings, *args, kv_window=tb)
        t0 = time.perf_counter()
        logits, cache = prefill(*args)
        first_token = self._compile(self._first, "first", timings, logits, key, recent, sampling=sampling)
        token, key, recent = first_token(logits, key, recent)
        first = np.asarray(token)
        timings.prompt_s = time.perf_counter() - t0

        produced = [0] * b
        finished = [limit <= 0 for limit in limits]
        new = self._accept(first[:, None], produced, finished, limits, stop_ids)
        timings.generated_tokens = sum(len(x) for x in new)
        yield StepOutput(new, finished, timings)

        column = tb
        kv_start_dev = self._batch_array(kv_start)
        while not all(finished):
            window = min(cache_len, self.buckets(column + self.chunk, minimum=256))
            if self.per_layer_cache and window > length:  # (runs asynchronously: timed with the chunk below)
                cache, length = self._compile(self._grow, "grow", timings, cache, length=window)(cache), window
            static = dict(n_steps=self.chunk, kv_window=window, sampling=sampling)
            args = (self.params, cache, token, np.int32(column), kv_start_dev, key, recent)
            decode = self._compile(self._decode, "decode", timings, *args, **static)
            t0 = time.perf_counter()
            steps, cache, key, recent = decode(*args)
            host = np.asarray(steps)
            timings.generate_s += time.perf_counter() - t0
            token = steps[:, -1]
            column += self.chunk
            new = self._accept(host, produced, finished, limits, stop_ids)
            timings.generated_tokens += sum(len(x) for x in new)
            yield StepOutput(new, finished, timings)

    @staticmethod
    def _accept(new: np.ndarray, produced: list[int], finished: list[bool], limits: list[int],
                stop_ids: frozenset[int]) -> list[list[int]]:
        """Host-side bookkeeping of one sync: cut each row at a stop id or its limit."""
        out = []
        for i, row in enumerate(new.tolist()):
            kept: list[int] = []
            for tok in row:
                if finished[i]:
                    break
                if tok in stop_ids:
                    finished[i] = True
                    break
                kept.append(tok)
                produced[i] += 1
                if produced[i] >= limits[i]:
                    finished[i] = True
            out.append(kept)
        return out

