"""The jitted programs over the slot cache: copy a prefilled request into its row, shift every row, and
decode a chunk with each row's own sampler settings.

The slot cache is one batched `text.KVCache` (per-layer or stacked, as `TextEngine` builds it) with one
row per slot. All rows write the same column each step (`TextEngine.generate`'s layout); row r's text
sits in columns [kv_start[r], column). A request prefilled alone (batch 1, left-padded to its bucket
`tb`, as `generate` prefills it) is copied into columns [C - n, C) of its row, C the shared column: RoPE
is already applied to the stored keys and the positions count from kv_start, so the row then decodes
exactly as it would alone.

Sampling per row (`sample_rows`): temperature 0 is the argmax of the (penalized) logits, as
`sampling.sample_next`; otherwise llama.cpp's chain (penalty, top-k, top-p, min-p, temperature) with
every setting a per-row array, and the draw is an inverse-CDF over the sorted candidates with one
uniform per row from the row's own PRNG key, so a seeded request draws the same tokens whatever else is
in the batch (and however many candidates the batch keeps).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from llava_jax.sampling import push_recent
from llava_jax.text import KVCache

RECENT = 64  # the repetition penalty's window (llama.cpp's --repeat-last-n default)
TOP_LOGPROBS = 20  # OpenAI's largest top_logprobs


@dataclass(frozen=True)
class SampleMode:
    """The static part of a decode program: what the rows in it need computed."""

    greedy: bool = True  # every row greedy: no candidates, no draw
    candidates: int = 0  # sorted candidates kept for the draw (largest top-k of the rows, or the vocabulary)
    penalize: bool = False  # some row has a repetition penalty != 1
    logprobs: bool = False  # some row asked for logprobs: the chosen token's and the TOP_LOGPROBS best


def _seq_axes(cache: KVCache) -> tuple[int, int]:
    """The sequence axis of the K and V arrays (per-layer: keys are transposed)."""
    return (-1, -2) if cache.per_layer else (2, 2)


def _map(cache: KVCache, fn_k, fn_v) -> KVCache:
    if cache.per_layer:
        return KVCache(tuple(fn_k(k) for k in cache.k), tuple(fn_v(v) for v in cache.v))
    return KVCache(fn_k(cache.k), fn_v(cache.v))


def shift_columns(cache: KVCache, delta) -> KVCache:
    """Every row moved by `delta` columns (column c gets old column c - delta; the vacated columns keep
    copies of finite values, never read: they are outside every row's [kv_start, column))."""
    ka, va = _seq_axes(cache)

    def move(x, axis):
        s = x.shape[axis]
        return jnp.take(x, jnp.clip(jnp.arange(s) - delta, 0, s - 1), axis=axis)

    return _map(cache, lambda k: move(k, ka), lambda v: move(v, va))


def join_row(shared: KVCache, small: KVCache, row, offset, lo, hi, *, batch: int) -> KVCache:
    """Row `row` of `shared` (batch rows) gets, for lo <= column < hi, column (column - offset) of the
    batch-1 cache `small`; its other columns and the other rows are kept."""
    ka, va = _seq_axes(shared) if shared.per_layer else (1, 1)  # stacked: [L, S, H, D] once the row is taken
    row_axis = 0 if shared.per_layer else 1

    def put(x, y, axis):
        if shared.per_layer and batch == 1:
            view = x
        else:
            view = jax.lax.dynamic_index_in_dim(x, row, row_axis, keepdims=False)
            y = jax.lax.index_in_dim(y, 0, row_axis, keepdims=False) if not shared.per_layer else y
        s, t = view.shape[axis], y.shape[axis]
        cols = jnp.arange(s)
        taken = jnp.take(y, jnp.clip(cols - offset, 0, t - 1), axis=axis)
        shape = [1] * view.ndim
        shape[axis] = s
        merged = jnp.where(((cols >= lo) & (cols < hi)).reshape(shape), taken.astype(view.dtype), view)
        if shared.per_layer and batch == 1:
            return merged
        return jax.lax.dynamic_update_index_in_dim(x, merged, row, row_axis)

    if shared.per_layer:
        return KVCache(tuple(put(x, y, ka) for x, y in zip(shared.k, small.k, strict=True)),
                       tuple(put(x, y, va) for x, y in zip(shared.v, small.v, strict=True)))
    return KVCache(put(shared.k, small.k, ka), put(shared.v, small.v, va))


def sample_rows(logits, keys, recent, temperature, top_k, top_p, min_p, penalty, mode: SampleMode):
    """One token per row from f32 logits [B, V] with per-row settings ([B] arrays; top_k 0 = off).

    keys uint32 [B, 2] (one raw PRNG key per row). Returns (tokens i32 [B], keys [B, 2], chosen logprob
    f32 [B], top logprobs f32 [B, TOP_LOGPROBS], their ids i32 [B, TOP_LOGPROBS]); the logprobs are the
    model's (log-softmax of the raw logits), zeros when `mode.logprobs` is off.
    """
    logits = logits.astype(jnp.float32)
    b, vocab = logits.shape
    x = logits
    if mode.penalize:
        valid = (recent >= 0) & (recent < vocab)
        seen = jnp.take_along_axis(x, jnp.where(valid, recent, 0), axis=-1)
        p = penalty[:, None]
        x = x.at[jnp.arange(b)[:, None], jnp.where(valid, recent, vocab)].set(
            jnp.where(seen <= 0, seen * p, seen / p), mode="drop")
    token = jnp.argmax(x, axis=-1).astype(jnp.int32)
    split = jax.vmap(lambda k: jax.random.split(k, 2))(keys)
    keys, subs = split[:, 0], split[:, 1]
    if not mode.greedy:
        k = mode.candidates
        cand, ids = jax.lax.top_k(x, k)
        pos = jnp.arange(k)[None]
        keep = pos < jnp.where((top_k > 0) & (top_k < k), top_k, k)[:, None]
        cand = jnp.where(keep, cand, -jnp.inf)
        probs = jax.nn.softmax(cand, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        keep &= (before < top_p[:, None]) | (top_p[:, None] >= 1.0) | (pos == 0)
        floor = cand[:, :1] + jnp.log(jnp.maximum(min_p, 1e-30))[:, None]
        keep &= (cand >= floor) | (min_p[:, None] <= 0.0)
        scaled = jnp.where(keep, cand / jnp.maximum(temperature, 1e-6)[:, None], -jnp.inf)
        cdf = jnp.cumsum(jax.nn.softmax(scaled, axis=-1), axis=-1)
        u = jax.vmap(lambda s: jax.random.uniform(s, (), jnp.float32))(subs)
        choice = jnp.minimum(jnp.sum(cdf < u[:, None] * cdf[:, -1:], axis=-1), k - 1)
        drawn = jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        token = jnp.where(temperature <= 0, token, drawn)
    if mode.logprobs:
        lp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(lp, token[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
    else:
        chosen = jnp.zeros((b,), jnp.float32)
        top_lp, top_ids = jnp.zeros((b, TOP_LOGPROBS), jnp.float32), jnp.zeros((b, TOP_LOGPROBS), jnp.int32)
    return token, keys, chosen, top_lp, top_ids.astype(jnp.int32)


def first_token(logits, keys, recent, temperature, top_k, top_p, min_p, penalty, *, mode: SampleMode):
    """`sample_rows` on the prefill's logits; the recent window gets the token."""
    out = sample_rows(logits, keys, recent, temperature, top_k, top_p, min_p, penalty, mode)
    return out + (push_recent(recent, out[0]),)


def decode_rows(model, params, cache, token, column, kv_start, keys, recent, temperature, top_k, top_p, min_p,
                penalty, *, n_steps: int, kv_window: int, mode: SampleMode):
    """Feed `token` [B] at `column`, then n_steps sample → feed steps, every row with its own settings.

    Returns (tokens [B, n_steps], logprobs [B, n_steps], top logprobs [B, n_steps, K], top ids, cache,
    keys, recent)."""

    def step(carry, _):
        cache, token, column, keys, recent = carry
        positions = (column - kv_start)[:, None]
        logits, cache = model.apply({"params": params}, token[:, None], positions, cache, column, kv_start, kv_window,
                                    logit_index=jnp.zeros_like(kv_start))
        nxt, keys, lp, top_lp, top_ids = sample_rows(logits, keys, recent, temperature, top_k, top_p, min_p, penalty,
                                                     mode)
        return (cache, nxt, column + 1, keys, push_recent(recent, nxt)), (nxt, lp, top_lp, top_ids)

    carry, (tokens, lps, top_lps, top_ids) = jax.lax.scan(step, (cache, token, column, keys, recent), None,
                                                          length=n_steps)
    cache, _, _, keys, recent = carry
    return (tokens.T, lps.T, top_lps.transpose(1, 0, 2), top_ids.transpose(1, 0, 2), cache, keys, recent)
