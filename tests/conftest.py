"""Strict test settings: two CPU devices, rank promotion raises, warnings are errors (pyproject)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_executables():
    """Drop every jit cache after each test module.

    Each XLA:CPU executable holds ~13-17 memory mappings (its LLVM-JIT code and data sections)
    for as long as a jit cache keeps it, and module-level jitted functions keep one per shape
    for the life of the process. The slow set compiles a few thousand, and at the kernel's
    vm.max_map_count (65530) the next mapping fails and LLVM aborts the process: the slow
    set's "Fatal Python error: Aborted" inside a training step, after a dozen earlier tests,
    which no test alone reproduces. (Reproduced directly by compiling one jitted function for
    ~4000 shapes in one process.)
    """
    yield
    jax.clear_caches()


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
