"""Sampling: greedy, determinism, the allowed sets of top-k / top-p / min-p (computed independently in
numpy), llama.cpp's repetition penalty, temperature statistics, and use under jit / lax.scan."""

from __future__ import annotations

import math

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from llava_jax.errors import LlavaError
from llava_jax.sampling import (
    SamplingParams,
    init_recent,
    initial_key,
    penalize_repeats,
    push_recent,
    sample_next,
)

sample_jit = jax.jit(sample_next, static_argnames="params")
penalize_jit = jax.jit(penalize_repeats, static_argnums=2)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
FAST = settings(max_examples=20, deadline=None)
N_DRAWS = 256  # rows per call: one call gives this many independent draws


def logit_rows(vocab: int):
    """Distinct f32 logits for one row (distinct, so top-k's set has no ties)."""
    return hnp.arrays(np.float32, vocab, elements=st.floats(-8, 8, width=32, allow_subnormal=False), unique=True)


def draws(row: np.ndarray, params: SamplingParams, seed: int) -> np.ndarray:
    """N_DRAWS independent samples from one row of logits."""
    logits = jnp.broadcast_to(jnp.asarray(row), (N_DRAWS, row.shape[0]))
    recent = jnp.full((N_DRAWS, 0), -1, jnp.int32)
    return np.asarray(sample_jit(logits, jax.random.key(seed), params, recent))


# ---------------------------------------------------------------- numpy reference of the filters


def allowed_set(row: np.ndarray, top_k: int, top_p: float, min_p: float, margin: float = 1e-4) -> set[int]:
    """Tokens llama.cpp's top-k → top-p → min-p chain may return, in float64.

    Calls `assume` away inputs within `margin` of a top-p or min-p boundary (f32 vs f64 rounding).
    """
    x = row.astype(np.float64)
    order = np.argsort(-x, kind="stable")
    if 0 < top_k < len(x):
        order = order[:top_k]
    vals = x[order]
    if top_p < 1.0:
        probs = np.exp(vals - vals.max())
        probs /= probs.sum()
        cum = np.cumsum(probs)
        assume(np.all(np.abs(cum[:-1] - top_p) > margin))
        n = int(np.argmax(cum >= top_p)) + 1 if np.any(cum >= top_p) else len(vals)
        order, vals = order[:n], vals[:n]
    if min_p > 0.0:
        threshold = vals[0] + math.log(min_p)
        assume(np.all(np.abs(vals - threshold) > margin))
        order = order[vals >= threshold]
    return set(order.tolist())


def check_draws(row: np.ndarray, params: SamplingParams, seed: int, allowed: set[int]) -> None:
    """Every draw is in `allowed`, and every allowed token with probability >= 0.05 under softmax(logits / T)
    over `allowed` shows up (missing one in 256 draws has probability < 2e-6), so a filter that keeps too
    little fails as well as one that keeps too much."""
    got = set(draws(row, params, seed).tolist())
    assert got <= allowed
    ids = np.array(sorted(allowed))
    z = row[ids].astype(np.float64) / params.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    assert set(ids[probs >= 0.05].tolist()) <= got


# ---------------------------------------------------------------- params


def test_defaults_are_llama_cpp_cli_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n, p.seed) == (1.0, 64, None)
    assert not p.greedy and SamplingParams(temperature=0).greedy and not SamplingParams(temperature=1e-3).greedy
    assert hash(p) == hash(SamplingParams())


@pytest.mark.parametrize("kwargs, name", [
    (dict(repeat_last_n=-1), "repeat_last_n"), (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(repeat_penalty=-1.1), "repeat_penalty"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(min_p=-0.01), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=-0.5), "top_p"), (dict(top_p=1.01), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"), (dict(top_p=float("inf")), "top_p"),
])
def test_bad_params_raise(kwargs, name):
    """Out-of-range settings are one-line errors, never a silently different sampler."""
    with pytest.raises(LlavaError) as e:
        SamplingParams(**kwargs)
    assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kwargs", [dict(min_p=0.0), dict(min_p=1.0), dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=0),
                                    dict(temperature=0.0), dict(repeat_penalty=1e-3)])
def test_edge_params_accepted(kwargs):
    SamplingParams(**kwargs)


def test_initial_key_from_seed():
    a = jax.random.key_data(initial_key(SamplingParams(seed=7)))
    b = jax.random.key_data(initial_key(SamplingParams(seed=7)))
    c = jax.random.key_data(initial_key(SamplingParams(seed=8)))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # no seed: a fresh random key each time (two 32-bit OS draws agree with probability 2**-32)
    r1, r2 = (jax.random.key_data(initial_key(SamplingParams())) for _ in range(2))
    assert r1.shape == a.shape and not np.array_equal(r1, r2)


# ---------------------------------------------------------------- greedy and determinism


@FAST
@given(
    data=hnp.arrays(
        np.float32,
        st.tuples(st.integers(1, 3), st.sampled_from([2, 9, 50])),
        elements=st.floats(-20, 20, width=32, allow_subnormal=False),
    ),
    temperature=st.sampled_from([0.0]),
)
def test_greedy_is_argmax(data, temperature):
    params = SamplingParams(temperature=temperature, top_k=40, top_p=0.95, min_p=0.05)
    recent = jnp.full((data.shape[0], 64), -1, jnp.int32)
    out = sample_jit(jnp.asarray(data), jax.random.key(0), params, recent)
    np.testing.assert_array_equal(np.asarray(out), np.argmax(data, axis=-1))


@FAST
@given(
    row=logit_rows(20),
    seed=st.integers(0, 2**31 - 1),
    params=st.sampled_from(
        [
            SamplingParams(),
            SamplingParams(temperature=1.5, **OFF),
            SamplingParams(temperature=2.0, top_k=5, top_p=0.8, min_p=0.1),
        ]
    ),
)
def test_same_key_same_tokens(row, seed, params):
    np.testing.assert_array_equal(draws(row, params, seed), draws(row, params, seed))


def test_different_keys_differ():
    row = np.zeros(50, np.float32)
    params = SamplingParams(temperature=1.0, **OFF)
    assert not np.array_equal(draws(row, params, 1), draws(row, params, 2))


# ---------------------------------------------------------------- the filters' allowed sets


@FAST
@given(row=logit_rows(24), k=st.sampled_from([1, 3, 10]), seed=st.integers(0, 2**31 - 1))
def test_top_k_stays_in_top_k(row, k, seed):
    params = SamplingParams(temperature=5.0, top_k=k, top_p=1.0, min_p=0.0)
    allowed = allowed_set(row, k, 1.0, 0.0)
    assert len(allowed) == k
    check_draws(row, params, seed, allowed)


@FAST
@given(row=logit_rows(24), p=st.sampled_from([0.3, 0.7, 0.95]), seed=st.integers(0, 2**31 - 1))
def test_top_p_stays_in_nucleus(row, p, seed):
    params = SamplingParams(temperature=5.0, top_k=0, top_p=p, min_p=0.0)
    check_draws(row, params, seed, allowed_set(row, 0, p, 0.0))


@FAST
@given(row=logit_rows(24), p=st.sampled_from([0.01, 0.1, 0.5]), seed=st.integers(0, 2**31 - 1))
def test_min_p_stays_above_threshold(row, p, seed):
    params = SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=p)
    check_draws(row, params, seed, allowed_set(row, 0, 1.0, p))


@FAST
@given(
    row=logit_rows(16),
    k=st.sampled_from([0, 4, 16]),
    p=st.sampled_from([1.0, 0.6]),
    m=st.sampled_from([0.0, 0.05]),
    seed=st.integers(0, 2**31 - 1),
)
def test_chain_stays_in_combined_set(row, k, p, m, seed):
    params = SamplingParams(temperature=5.0, top_k=k, top_p=p, min_p=m)
    check_draws(row, params, seed, allowed_set(row, k, p, m))


def test_filters_always_keep_the_top_token():
    row = np.array([5.0, 0.0, -1.0], np.float32)
    for params in [
        SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
        SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, min_p=0.0),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=1.0),
    ]:
        assert set(draws(row, params, 0).tolist()) == {0}


# ---------------------------------------------------------------- repetition penalty


def greedy_pick(logits, recent, penalty):
    params = SamplingParams(temperature=0.0, repeat_penalty=penalty, repeat_last_n=len(recent))
    out = sample_jit(jnp.asarray([logits], jnp.float32), jax.random.key(0), params, jnp.asarray([recent], jnp.int32))
    return int(out[0])


def test_penalty_moves_greedy_choice_positive_logits():
    logits = [4.0, 3.0, 0.5]
    assert greedy_pick(logits, [-1, -1], 1.5) == 0
    assert greedy_pick(logits, [0, -1], 1.5) == 1  # 4 / 1.5 = 2.67 < 3


def test_penalty_multiplies_negative_logits():
    logits = [-1.0, -1.5, -4.0]
    assert greedy_pick(logits, [5, 5], 2.0) == 0  # token 5 is out of range for V=3: ignored
    assert greedy_pick(logits, [0], 2.0) == 1  # -1 * 2 = -2 < -1.5 (dividing would raise it)


def test_penalty_once_per_distinct_token():
    logits = [4.0, 2.5, 0.0]
    # Applied once: 4 / 1.5 = 2.67 > 2.5. Applied three times it would be 1.19.
    assert greedy_pick(logits, [0, 0, 0], 1.5) == 0


def test_empty_slots_penalize_nothing():
    logits = np.array([[3.0, 1.0, -2.0, 5.0]], np.float32)
    recent = jnp.asarray([[-1, -1, -1]], jnp.int32)  # -1 must not wrap to the last token
    out = penalize_repeats(jnp.asarray(logits), recent, 3.0)
    np.testing.assert_array_equal(np.asarray(out), logits)


@FAST
@given(
    logits=hnp.arrays(np.float32, (2, 12), elements=st.floats(-10, 10, width=32, allow_subnormal=False)),
    recent=hnp.arrays(np.int32, (2, 6), elements=st.integers(-1, 11)),
    penalty=st.sampled_from([0.5, 1.1, 2.0]),
)
def test_penalty_matches_numpy(logits, recent, penalty):
    want = logits.copy()
    for b in range(2):
        for tok in set(recent[b].tolist()) - {-1}:
            v = want[b, tok]
            want[b, tok] = v * np.float32(penalty) if v <= 0 else v / np.float32(penalty)
    got = penalize_jit(jnp.asarray(logits), jnp.asarray(recent), penalty)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-30)  # XLA flushes subnormals


# ---------------------------------------------------------------- temperature statistics


@pytest.mark.parametrize("temperature, top_k", [(0.7, 0), (1.3, 0), (1.0, 2)])
def test_frequencies_follow_softmax(temperature, top_k):
    """n = 40,000 draws; each frequency within 5 standard errors (sqrt(p(1-p)/n)) of the softmax of
    logits / T over the kept tokens. The key is fixed, so the test is deterministic."""
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 40_000
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0, min_p=0.0)
    batch = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    out = np.asarray(sample_jit(batch, jax.random.key(1234), params, jnp.zeros((n, 0), jnp.int32)))
    kept = logits if top_k == 0 else np.where(np.arange(len(logits)) < top_k, logits, -np.inf)
    want = np.exp(kept / temperature - np.max(kept / temperature))
    want /= want.sum()
    freq = np.bincount(out, minlength=len(logits)) / n
    tol = 5 * np.sqrt(want * (1 - want) / n) + 1e-12
    assert np.all(np.abs(freq - want) <= tol), (freq, want)


# ---------------------------------------------------------------- jit, batches, scan, cost


def test_jit_batch_of_rows():
    b, v, n = 3, 1000, 64
    logits = jax.random.normal(jax.random.key(0), (b, v)) * 3
    recent = jnp.asarray(init_recent([[1, 2, 3], [], list(range(100))], n))
    out = sample_jit(logits, jax.random.key(1), SamplingParams(repeat_penalty=1.1), recent)
    assert out.shape == (b,) and out.dtype == jnp.int32
    assert np.all((np.asarray(out) >= 0) & (np.asarray(out) < v))


def test_push_and_init_recent():
    r = init_recent([[7, 8], [1, 2, 3, 4, 5]], 3)
    np.testing.assert_array_equal(r, [[-1, 7, 8], [3, 4, 5]])
    r2 = push_recent(jnp.asarray(r), jnp.asarray([9, 6], jnp.int32))
    np.testing.assert_array_equal(np.asarray(r2), [[7, 8, 9], [4, 5, 6]])
    empty = jnp.zeros((2, 0), jnp.int32)
    assert push_recent(empty, jnp.asarray([1, 2])).shape == (2, 0)
    assert init_recent([[1, 2]], 0).shape == (1, 0)


def test_scan_loop_with_penalty_alternates():
    """Greedy with a window of 1 and penalty 2 on constant logits [3, 2.9, 0]: 0, 1, 0, 1, ..."""
    params = SamplingParams(temperature=0.0, repeat_penalty=2.0, repeat_last_n=1)
    logits = jnp.asarray([[3.0, 2.9, 0.0]] * 2)

    @jax.jit
    def run(key, recent):
        def step(carry, _):
            key, recent = carry
            key, sub = jax.random.split(key)
            tok = sample_next(logits, sub, params, recent)
            return (key, push_recent(recent, tok)), tok

        return jax.lax.scan(step, (key, recent), length=6)[1]

    toks = np.asarray(run(jax.random.key(0), jnp.full((2, 1), -1, jnp.int32)))
    np.testing.assert_array_equal(toks[:, 0], [0, 1, 0, 1, 0, 1])


def primitives(params: SamplingParams, vocab: int = 1000, n: int = 8) -> list[str]:
    """Names of every primitive in the traced program, nested jaxprs included."""
    fn = lambda logits, key, recent: sample_next(logits, key, params, recent)
    args = (jnp.zeros((2, vocab)), jax.random.key(0), jnp.zeros((2, n), jnp.int32))
    closed = jax.make_jaxpr(fn)(*args)

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            yield eqn.primitive.name
            for value in eqn.params.values():
                for sub in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        yield from walk(inner)

    return list(walk(closed.jaxpr))


def test_disabled_filters_cost_nothing():
    prims = primitives(SamplingParams(temperature=0.8, **OFF))
    for name in ("top_k", "sort", "cumsum", "scatter"):
        assert name not in prims
    greedy = primitives(SamplingParams(temperature=0.0, **OFF))
    assert "argmax" in greedy and "top_k" not in greedy and "random_bits" not in greedy


def test_top_k_uses_one_top_k_and_no_sort():
    prims = primitives(SamplingParams(repeat_penalty=1.1))
    assert prims.count("top_k") == 1 and "sort" not in prims
    top_p_alone = primitives(SamplingParams(top_k=0, top_p=0.9))
    assert top_p_alone.count("top_k") + top_p_alone.count("sort") == 1
