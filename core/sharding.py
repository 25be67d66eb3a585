"""Shard particle (or sample, or batch) pytrees over a one-axis device mesh.

Particles live on the leading axis of every leaf; `shard_particles` places that axis across the
devices of a `jax.sharding.Mesh` with a single axis named "particles". Computations jitted over
sharded particles are partitioned by XLA; resampling gathers across devices.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from feynkit.core.types import PyTree

__all__ = ["AXIS", "check_divisible", "particle_mesh", "particle_sharding", "shard_particles"]

AXIS = "particles"


def particle_mesh(devices=None) -> Mesh:
    """A one-axis mesh over `devices` (default: all devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (AXIS,))


def particle_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over the mesh, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(AXIS))


def check_divisible(num_particles: int, mesh: Mesh) -> None:
    """Raise `ValueError` unless `num_particles` splits evenly over the mesh's devices."""
    n_dev = mesh.devices.size
    if num_particles % n_dev:
        lower = num_particles - num_particles % n_dev
        raise ValueError(
            f"{num_particles} particles do not divide over {n_dev} devices: use a multiple of "
            f"{n_dev} (e.g. {lower or n_dev} or {lower + n_dev})."
        )


def shard_particles(particles: PyTree, mesh: Mesh) -> PyTree:
    """Place every leaf's leading (particle) axis across `mesh`."""
    leaves = jax.tree.leaves(particles)
    if not leaves:
        return particles
    lead = leaves[0].shape[:1]  # () for a scalar leaf, which has no particle axis
    for leaf in leaves:
        if not lead or leaf.shape[:1] != lead:
            raise ValueError(
                "every leaf needs the same leading particle axis; got shapes "
                f"{leaves[0].shape} and {leaf.shape}."
            )
    check_divisible(lead[0], mesh)
    return jax.device_put(particles, particle_sharding(mesh))
