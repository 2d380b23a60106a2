"""Token sampling as pure, jit-able functions for the `lax.scan` decode loop (no host sync).

The chain and its semantics follow llama.cpp's default sampler chain (`common/sampling.cpp`,
`src/llama-sampling.cpp`), restricted to the samplers the CLI exposes:

    repetition penalty → top-k → top-p → min-p → temperature → categorical draw

* Repetition penalty: every *distinct* token in the recent window is penalized once (however often it
  occurs): a positive logit is divided by the penalty, a zero or negative one multiplied by it.
* top-k keeps the k largest logits; top-p keeps the shortest prefix of the sorted candidates whose
  cumulative probability (softmax over the candidates that are left) reaches p; min-p keeps the
  candidates whose probability is at least `min_p` times the largest (`logit >= max + log(min_p)`).
  All three always keep the most likely token.
* The temperature divides the logits *after* the filters, so it never changes which tokens survive.
  `temperature == 0` is greedy: the argmax of the penalized logits (the filters cannot move it).

Filters that are switched off (`top_k == 0` or `top_k >= V`, `top_p == 1`, `min_p == 0`, penalty 1 or
an empty window) are decided on the static `SamplingParams`, so they add nothing to the compiled
program. When top-k is on, one `lax.top_k` with k = top_k gives the sorted candidates that top-p and
min-p then work on, so the cost is O(V log k) and the draw is over k values; only top-p without
top-k sorts the whole vocabulary.

Randomness: the caller keeps a PRNG key in the scan carry and splits it each step; `initial_key`
turns `SamplingParams.seed` into the first key. One key serves a whole batch: the rows draw
independently.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from llava_jax.errors import LlavaError


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; hashable so it can be a static argument to `jax.jit`.

    The defaults are llama.cpp's library defaults (`--temp 0.8 --top-k 40 --top-p 0.95 --min-p 0.05
    --repeat-penalty 1.0 --repeat-last-n 64`; `python -m llava_jax.run` uses llama-mtmd-cli's
    `--temp 0.2`). `repeat_last_n` is the window length N of the `recent` array; llama.cpp's `-1`
    ("the whole context") must be resolved to a number by the caller. `seed=None` means a random
    seed (`initial_key`). Values out of range (temperature < 0, top_k < 0, top_p outside (0, 1],
    min_p outside [0, 1], repeat_penalty <= 0) raise a one-line LlavaError.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise LlavaError(f"sampling: {name} must be a finite number, got {getattr(self, name)}")
        for name in ("top_k", "repeat_last_n"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int | np.integer):
                raise LlavaError(f"sampling: {name} must be an integer, got {getattr(self, name)!r}")
        checks = (
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1] (1 = off), got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1] (0 = off), got {self.min_p}"),
            (self.repeat_penalty > 0, f"repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty}"),
            (self.repeat_last_n >= 0,
             f"repeat_last_n must be >= 0 (0 = off; resolve -1 to the context size), got {self.repeat_last_n}"),
        )
        for ok, message in checks:
            if not ok:
                raise LlavaError(f"sampling: {message}")

    @property
    def greedy(self) -> bool:
        """True when the temperature is 0: take the argmax of the penalized logits."""
        return self.temperature <= 0

    @property
    def penalizes(self) -> bool:
        """True when the repetition penalty does anything."""
        return self.repeat_penalty != 1.0 and self.repeat_last_n > 0


def initial_key(params: SamplingParams) -> jax.Array:
    """The first PRNG key of a run: from `params.seed`, or from the OS when the seed is None."""
    seed = secrets.randbits(32) if params.seed is None else params.seed
    return jax.random.key(seed)


# --------------------------------------------------------------------------------------------
# The filters. Each takes logits (f32[..., n]) and returns logits of the same shape with the
# tokens it removes set to -inf.
# --------------------------------------------------------------------------------------------


def penalize_repeats(logits: jax.Array, recent: jax.Array, penalty: float) -> jax.Array:
    """llama.cpp's repetition penalty. logits f32[B, V]; recent i32[B, N] with -1 for empty slots.

    Gathers the logits of the window's tokens, penalizes them and scatters them back; a token that
    occurs several times is written several times with the same value, so it is penalized once.
    Costs O(B·N), not O(B·V).
    """
    vocab = logits.shape[-1]
    valid = (recent >= 0) & (recent < vocab)
    seen = jnp.take_along_axis(logits, jnp.where(valid, recent, 0), axis=-1)
    penalized = jnp.where(seen <= 0, seen * penalty, seen / penalty)
    target = jnp.where(valid, recent, vocab)  # out of range: the scatter drops empty slots
    rows = jnp.arange(logits.shape[0])[:, None]
    return logits.at[rows, target].set(penalized, mode="drop")


def top_k_candidates(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k largest logits, sorted descending, and their token ids: (f32[B, k], i32[B, k])."""
    return jax.lax.top_k(logits, k)


def top_p_filter_sorted(sorted_logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter on logits sorted descending along the last axis.

    Keeps candidate i while the cumulative probability of candidates 0..i-1 is still below p, i.e.
    the shortest prefix whose total reaches p (llama.cpp's rule); candidate 0 is always kept.
    """
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    cum_before = jnp.concatenate([jnp.zeros_like(cum[..., :1]), cum[..., :-1]], axis=-1)
    keep = (cum_before < p) | (jnp.arange(sorted_logits.shape[-1]) == 0)
    return jnp.where(keep, sorted_logits, -jnp.inf)


def min_p_filter(logits: jax.Array, p: float, *, sorted_desc: bool = False) -> jax.Array:
    """Keeps the tokens whose probability is at least p times the largest: logit >= max + log(p)."""
    top = logits[..., :1] if sorted_desc else jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(logits >= top + math.log(p), logits, -jnp.inf)


def apply_temperature(logits: jax.Array, temperature: float) -> jax.Array:
    return logits / jnp.float32(temperature)


# --------------------------------------------------------------------------------------------
# The chain.
# --------------------------------------------------------------------------------------------


def sample_next(logits: jax.Array, key: jax.Array, params: SamplingParams, recent: jax.Array) -> jax.Array:
    """One token per row: logits f32[B, V], key (one PRNG key), recent i32[B, N] → i32[B].

    `recent` holds the last N tokens of each row (prompt and generated), -1 for empty slots; N is
    normally `params.repeat_last_n` (any N works, 0 included). `params` must be static under jit.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    if params.penalizes and recent.shape[-1] > 0:
        logits = penalize_repeats(logits, recent, params.repeat_penalty)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    top_k_on = 0 < params.top_k < vocab
    top_p_on = params.top_p < 1.0
    min_p_on = params.min_p > 0.0

    if top_k_on or top_p_on:
        # Sorted candidates: k of them with top-k, the whole vocabulary for top-p alone.
        cand, ids = top_k_candidates(logits, params.top_k if top_k_on else vocab)
        if top_p_on:
            cand = top_p_filter_sorted(cand, params.top_p)
        if min_p_on:
            cand = min_p_filter(cand, params.min_p, sorted_desc=True)
        choice = jax.random.categorical(key, apply_temperature(cand, params.temperature), axis=-1)
        return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    if min_p_on:
        logits = min_p_filter(logits, params.min_p)
    return jax.random.categorical(key, apply_temperature(logits, params.temperature), axis=-1).astype(jnp.int32)


def push_recent(recent: jax.Array, tokens: jax.Array) -> jax.Array:
    """Shifts each row's window left by one and appends the new token: i32[B, N], i32[B] → i32[B, N]."""
    if recent.shape[-1] == 0:
        return recent
    return jnp.concatenate([recent[:, 1:], tokens[:, None].astype(recent.dtype)], axis=-1)


def init_recent(rows: Sequence[Sequence[int]], n: int) -> np.ndarray:
    """Host-side start of the window: the last n tokens of each row, right-aligned, -1 padded. i32[B, n]."""
    out = np.full((len(rows), n), -1, dtype=np.int32)
    for i, row in enumerate(rows):
        tail = list(row)[-n:] if n > 0 else []
        if tail:
            out[i, n - len(tail) :] = tail
    return out
