"""M-FAC against the dense inverse of the damped empirical Fisher (float64, small sizes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression import prune


@pytest.mark.parametrize("m,d,block", [(5, 12, None), (16, 12, 4), (3, 8, 8)])
def test_ifvp_and_diag_match_the_dense_inverse_fisher(m, d, block):
    rng = np.random.default_rng(m + d)
    G = rng.normal(size=(m, d))
    v = rng.normal(size=d)
    damp = 0.1
    B = d if block is None else block
    F = np.zeros((d, d))
    for b in range(d // B):
        s = slice(b * B, (b + 1) * B)
        F[s, s] = damp * np.eye(B) + G[:, s].T @ G[:, s] / m
    Finv = np.linalg.inv(F)
    with jax.enable_x64(True):
        f = prune.mfac(jnp.asarray(G), damp, block)
        np.testing.assert_allclose(
            np.asarray(prune.mfac_ifvp(f, jnp.asarray(v))), Finv @ v, rtol=1e-10, atol=1e-12
        )
        np.testing.assert_allclose(
            np.asarray(prune.mfac_diag(f)), np.diag(Finv), rtol=1e-10, atol=1e-12
        )


def test_bad_inputs():
    with pytest.raises(ValueError, match="damp"):
        prune.mfac(np.ones((2, 4)), 0.0)
    with pytest.raises(ValueError, match="block_size=3 must divide"):
        prune.mfac(np.ones((2, 4)), 1.0, 3)


def test_obert_matches_dense_obs_with_the_fisher():
    """oBERT through M-FAC against dense float64 OBS with the same block Fisher: saliencies,
    mask and the summed single-weight update."""
    rng = np.random.default_rng(7)
    d_in, d_out, m, B = 8, 4, 6, 8
    w = rng.normal(size=(d_in, d_out))
    grads = rng.normal(size=(m, d_in, d_out))
    G = np.swapaxes(grads, 1, 2).reshape(m, -1)
    lam = 1e-2 * np.mean(np.sum(G**2, 0) / m)
    F = np.zeros((32, 32))
    for b in range(32 // B):
        s = slice(b * B, (b + 1) * B)
        F[s, s] = lam * np.eye(B) + G[:, s].T @ G[:, s] / m
    Finv = np.linalg.inv(F)
    wt = w.T.ravel()
    rho = wt**2 / (2 * np.diag(Finv))
    pruned = np.argsort(rho, kind="stable")[:16]
    v = np.zeros(32)
    v[pruned] = wt[pruned] / np.diag(Finv)[pruned]
    ref = wt - Finv @ v
    ref[pruned] = 0
    with jax.enable_x64(True):
        out, keep = prune.obert_prune(
            jnp.asarray(w), jnp.asarray(grads), 0.5, damp=1e-2, block_size=B
        )
    np.testing.assert_array_equal(np.flatnonzero(~np.asarray(keep).T.ravel()), np.sort(pruned))
    np.testing.assert_allclose(np.asarray(out).T.ravel(), ref, rtol=1e-9, atol=1e-12)
