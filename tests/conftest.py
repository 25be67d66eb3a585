"""Strict test settings: two CPU devices, rank promotion raises, warnings are errors (pyproject)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture(scope="session", autouse=True)
def _session_model_cache(tmp_path_factory):
    """Models trained by smoke runs go to one cache for the whole session (not ~/.cache), so the
    replications' smoke tests train each small model once and never touch the user's cache."""
    from feynkit.experiments.train import CACHE_ENV

    old = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("feynkit_model_cache"))
    yield
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old
