"""Tests for feynkit.core.sharding on the two forced CPU devices (tests/conftest.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from feynkit.core import (
    check_divisible,
    particle_mesh,
    particle_sharding,
    resample_particles,
    shard_particles,
    systematic_resample,
)
from feynkit.core.sharding import AXIS

pytestmark = pytest.mark.skipif(jax.device_count() < 2, reason="needs two (forced CPU) devices")


def _particles(n):
    rng = np.random.default_rng(0)
    return {
        "x": rng.standard_normal((n, 3)).astype(np.float32),
        "id": np.arange(n, dtype=np.int32),
        "nested": (rng.standard_normal((n, 2, 2)).astype(np.float32),),
    }


def test_mesh_and_sharding_spec():
    mesh = particle_mesh()
    assert AXIS == "particles"
    assert mesh.axis_names == ("particles",)
    assert mesh.devices.size == jax.device_count()
    sharding = particle_sharding(mesh)
    assert isinstance(sharding, NamedSharding)
    assert sharding.spec == PartitionSpec("particles")


def test_shard_particles_keeps_values_and_splits_leading_axis():
    mesh = particle_mesh()
    n_dev = mesh.devices.size
    n = 4 * n_dev
    host = _particles(n)
    sharded = shard_particles(jax.tree.map(jnp.asarray, host), mesh)
    assert jax.tree.structure(sharded) == jax.tree.structure(host)
    for got, want in zip(jax.tree.leaves(sharded), jax.tree.leaves(host), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
        assert got.sharding.spec == PartitionSpec("particles")
        shards = sorted(got.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == n_dev
        assert {s.device for s in shards} == set(mesh.devices.flat)
        for k, shard in enumerate(shards):
            rows = slice(4 * k, 4 * (k + 1))
            assert shard.data.shape == (4, *want.shape[1:])
            np.testing.assert_array_equal(shard.data, want[rows])


def test_resampling_sharded_particles_gathers_correctly():
    mesh = particle_mesh()
    n = 8 * mesh.devices.size
    host = _particles(n)
    sharded = shard_particles(jax.tree.map(jnp.asarray, host), mesh)
    lw = jnp.asarray(np.random.default_rng(1).standard_normal(n), jnp.float32)

    @jax.jit
    def step(key, particles, lw):
        anc = systematic_resample(key, lw, n)
        out = resample_particles(particles, anc)
        return jax.lax.with_sharding_constraint(out, particle_sharding(mesh)), anc

    out, anc = step(jax.random.key(0), sharded, lw)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(host), strict=True):
        np.testing.assert_array_equal(got, want[np.asarray(anc)])
        assert got.sharding.spec == PartitionSpec("particles")


@pytest.mark.parametrize("n", [1, 3, 7, 101])
def test_indivisible_particle_count_raises_with_valid_suggestions(n):
    mesh = particle_mesh()
    n_dev = mesh.devices.size
    with pytest.raises(ValueError, match=rf"{n} particles do not divide over {n_dev} devices") as e:
        shard_particles({"x": jnp.zeros((n, 2))}, mesh)
    suggestions = [int(v) for v in re.search(r"e\.g\. (\d+) or (\d+)", str(e.value)).groups()]
    for count in suggestions:
        assert count > 0 and count % n_dev == 0
        check_divisible(count, mesh)  # a suggested count is accepted
    assert min(abs(c - n) for c in suggestions) < n_dev  # and is a nearest multiple


def test_mismatched_leading_axes_raise():
    mesh = particle_mesh()
    with pytest.raises(ValueError, match="same leading particle axis"):
        shard_particles({"x": jnp.zeros((4, 2)), "y": jnp.zeros((6,))}, mesh)
    with pytest.raises(ValueError, match="same leading particle axis"):
        shard_particles({"x": jnp.zeros((4,)), "s": jnp.zeros(())}, mesh)


def test_empty_pytree_passes_through():
    assert shard_particles({}, particle_mesh()) == {}
