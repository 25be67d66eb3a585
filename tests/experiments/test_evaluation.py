"""LM evaluation against float64 NumPy on a tiny bigram 'model' (logits = a table row)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.experiments import evaluation as ev

VOCAB = 5


def _table(seed=0):
    return {"table": jax.random.normal(jax.random.key(seed), (VOCAB, VOCAB)) * 2.0}


def _apply(params, tokens):
    return params["table"][tokens]


def _reference_nll(table, tokens, seq_len):
    """Mean −log p(x_i | x_{i−1}) over every token scored by windows of seq_len + 1 at stride
    seq_len, in float64."""
    t = np.asarray(table, np.float64)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    n = (len(tokens) - 1) // seq_len
    scored = np.arange(1, n * seq_len + 1)
    return -np.mean(logp[tokens[scored - 1], tokens[scored]])


def test_scoring_windows_overlap_by_one_and_cover_each_token_once():
    tokens = np.arange(23)
    w = ev.scoring_windows(tokens, 5)
    assert w.shape == (4, 6) and w.dtype == np.int32
    np.testing.assert_array_equal(w[:, -1], w[1:, 0].tolist() + [20])
    np.testing.assert_array_equal(w[:, 1:].ravel(), np.arange(1, 21))
    assert ev.scoring_windows(tokens, 5, count=2).shape == (2, 6)
    assert ev.scoring_windows(tokens, 5, start=3)[0, 0] == 3
    with pytest.raises(ValueError, match="seq_len"):
        ev.scoring_windows(tokens[:5], 5)


def test_lm_nll_and_perplexity_match_float64_reference():
    params = _table()
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (61,), 0, VOCAB))
    ref = _reference_nll(params["table"], tokens, 6)
    w = ev.scoring_windows(tokens, 6)
    assert float(ev.lm_nll(_apply, params, w)) == pytest.approx(ref, rel=1e-6)
    assert ev.lm_perplexity(_apply, params, w) == pytest.approx(math.exp(ref), rel=1e-6)
    logits = _apply(params, jnp.asarray(w[:, :-1]))
    assert float(ev.mean_token_nll(logits, w[:, 1:])) == pytest.approx(ref, rel=1e-6)


def test_windowed_nll_pads_the_last_batch_and_matches_reference():
    params = _table(2)
    tokens = np.asarray(jax.random.randint(jax.random.key(3), (50,), 0, VOCAB))
    ref = _reference_nll(params["table"], tokens, 4)
    nll, scored, speed = ev.windowed_nll(_apply, params, tokens, 4, batch_size=5)  # 12 windows
    assert scored == 48 and speed > 0
    assert nll == pytest.approx(ref, rel=1e-6)


def test_lm_nll_fn_compiles_once_for_many_parameter_sets():
    tokens = np.asarray(jax.random.randint(jax.random.key(4), (41,), 0, VOCAB))
    traces = []

    def counted(params, x):
        traces.append(1)
        return _apply(params, x)

    f = ev.lm_nll_fn(counted, tokens, 8)
    for seed in range(3):
        p = _table(seed)
        assert f(p) == pytest.approx(_reference_nll(p["table"], tokens, 8), rel=1e-6)
    assert len(traces) == 1


def test_consecutive_windows_and_group_for():
    w = ev.consecutive_windows(np.arange(20), 3, 4, start=2)
    np.testing.assert_array_equal(w, np.arange(2, 14).reshape(3, 4))
    with pytest.raises(ValueError, match="lower count or length"):
        ev.consecutive_windows(np.arange(10), 3, 4)
    assert ev.group_for(128, 64) == 64 and ev.group_for(344, 64) == 43 and ev.group_for(7, 64) == 7
    with pytest.raises(ValueError, match="target"):
        ev.group_for(8, 0)
