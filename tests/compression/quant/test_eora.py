"""EoRA against the closed-form optimum of activation-weighted low-rank approximation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant.eora import (
    LowRankCompensation,
    activation_weighted_error,
    apply_compensation,
    eora_compensation,
    svd_compensation,
)

D_IN, D_OUT, N = 48, 40, 512


def _problem(seed=0):
    """Anisotropic inputs (a few dominant channels, as in LLM activations) and a weight error."""
    rng = np.random.default_rng(seed)
    scales = np.exp(rng.normal(0.0, 1.0, D_IN))
    scales[:3] *= 20.0
    mix = np.linalg.qr(rng.normal(size=(D_IN, D_IN)))[0]
    x = (rng.normal(size=(N, D_IN)) * scales[None, :]) @ mix
    delta = rng.normal(size=(D_IN, D_OUT)) * 0.1
    return x, delta


def _weighted_residual(x, delta, comp):
    r = delta - np.asarray(comp.a, np.float64) @ np.asarray(comp.b, np.float64)
    return float(np.sum((x @ r) ** 2))


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_eora_reaches_the_closed_form_optimum(rank):
    x, delta = _problem()
    comp = eora_compensation(delta, x.T @ x, rank)
    assert comp.a.shape == (D_IN, rank) and comp.b.shape == (rank, D_OUT)
    # X has full column rank, so X M ranges over all rank-r matrices in span(X) ∋ X ΔW:
    # the optimum is the Eckart–Young tail of the singular values of X ΔW (float64).
    sv = np.linalg.svd(x @ delta, compute_uv=False)
    optimum = float(np.sum(sv[rank:] ** 2))
    got = _weighted_residual(x, delta, comp)
    assert got == pytest.approx(optimum, rel=2e-3)
    # The plain SVD of ΔW is strictly worse on anisotropic inputs.
    assert _weighted_residual(x, delta, svd_compensation(delta, rank)) > 1.05 * got


def test_eora_error_decreases_with_rank_and_vanishes_at_full_rank():
    x, delta = _problem(1)
    cov = x.T @ x
    errs = [_weighted_residual(x, delta, eora_compensation(delta, cov, r)) for r in (1, 2, 8, 32)]
    assert all(a > b for a, b in zip(errs, errs[1:], strict=False))
    full = _weighted_residual(x, delta, eora_compensation(delta, cov, min(D_IN, D_OUT)))
    assert full < 1e-6 * float(np.sum((x @ delta) ** 2))


def test_svd_compensation_is_the_frobenius_optimum():
    _, delta = _problem(2)
    comp = svd_compensation(delta, 5)
    sv = np.linalg.svd(delta, compute_uv=False)
    resid = delta - np.asarray(comp.a, np.float64) @ np.asarray(comp.b, np.float64)
    assert np.sum(resid**2) == pytest.approx(np.sum(sv[5:] ** 2), rel=1e-4)


def test_isotropic_inputs_make_eora_equal_to_svd():
    _, delta = _problem(3)
    eo = eora_compensation(delta, 7.0 * np.eye(D_IN), 6)
    sv = svd_compensation(delta, 6)
    np.testing.assert_allclose(eo.a @ eo.b, sv.a @ sv.b, atol=1e-4)


def test_singular_covariance_stays_finite_and_scale_free():
    x, delta = _problem(4)
    x_low = x[:, :10] @ np.random.default_rng(0).normal(size=(10, D_IN))  # rank-10 inputs
    cov = x_low.T @ x_low
    comp = eora_compensation(delta, cov, 4)
    assert np.all(np.isfinite(comp.a)) and np.all(np.isfinite(comp.b))
    scaled = eora_compensation(delta, 123.0 * cov, 4)
    np.testing.assert_allclose(x_low @ (scaled.a @ scaled.b), x_low @ (comp.a @ comp.b), atol=1e-3)


def test_apply_jit_and_weighted_error():
    x, delta = _problem(5)
    cov = jnp.asarray(x.T @ x, jnp.float32)
    comp = jax.jit(eora_compensation, static_argnames="rank")(delta, cov, rank=3)
    assert isinstance(comp, LowRankCompensation)
    xb = jnp.asarray(x[:7], jnp.float32)
    np.testing.assert_allclose(
        apply_compensation(xb, comp), xb @ (comp.a @ comp.b), rtol=1e-4, atol=1e-4
    )
    err = activation_weighted_error(delta, cov)
    assert float(err) == pytest.approx(float(np.sum((x @ delta) ** 2)), rel=1e-4)


def test_bad_input_messages():
    with pytest.raises(ValueError, match="rank"):
        svd_compensation(np.ones((4, 3)), 4)
    with pytest.raises(ValueError, match="cov must be"):
        eora_compensation(np.ones((4, 3)), np.eye(3), 2)
