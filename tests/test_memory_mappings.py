"""The slow set's abort and its fix: compiled XLA:CPU executables hold memory mappings until
their jit caches are cleared (tests/conftest.py clears them after every module; `--multirun`
after every job), so a long process stays far below vm.max_map_count."""

import gc

import jax
import jax.numpy as jnp
import pytest

from tests.conftest import memory_mappings

pytestmark = pytest.mark.skipif(memory_mappings() is None, reason="needs Linux /proc/self/maps")

SHAPES = 40


def test_clearing_jit_caches_returns_the_executables_mappings():
    f = jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)
    f(jnp.ones(1)).block_until_ready()
    jax.clear_caches()
    gc.collect()
    before = memory_mappings()
    for n in range(2, 2 + SHAPES):  # one executable per shape
        f(jnp.ones(n)).block_until_ready()
    held = memory_mappings() - before
    jax.clear_caches()
    gc.collect()
    left = memory_mappings() - before
    # Measured on jaxlib 0.10.2 CPU: ~6 mappings per executable held, none left after clearing.
    assert held >= 2 * SHAPES, f"{SHAPES} executables hold only {held} mappings"
    assert left <= 0.25 * held, f"{left} of {held} mappings survive jax.clear_caches()"
