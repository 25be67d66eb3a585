"""Data for the experiments: labelled 2-D toy sets, 8x8 digits, a byte-level Python-source corpus,
and keyed minibatch iterators.

Everything random takes an explicit `key` first; nothing is downloaded (the digits ship with
scikit-learn, the corpus is the Python standard library's own source on disk).
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.types import Array, ArrayLike, Float, Int, Key, PyTree

__all__ = [
    "BYTE_VOCAB_SIZE",
    "DigitsSplit",
    "TextCorpus",
    "array_batches",
    "byte_decode",
    "byte_encode",
    "checkerboard",
    "circle_centers",
    "gaussian_mixture_2d",
    "load_digits_split",
    "load_stdlib_corpus",
    "split_files",
    "stdlib_source_files",
    "token_batches",
    "token_windows",
    "two_moons",
]

# ---------------------------------------------------------------------------------------------
# 2-D toy sets: (key, n) -> (x (n, 2), labels (n,))
# ---------------------------------------------------------------------------------------------


def circle_centers(num_modes: int = 8, radius: float = 4.0) -> Float[Array, "k 2"]:
    """`num_modes` points equally spaced on a circle of `radius`, the first at angle 0."""
    angles = 2.0 * jnp.pi * jnp.arange(num_modes) / num_modes
    return radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=-1)


@functools.partial(jax.jit, static_argnames=("n", "num_modes"))
def gaussian_mixture_2d(
    key: Key, n: int, num_modes: int = 8, radius: float = 4.0, scale: float = 0.5
) -> tuple[Float[Array, "n 2"], Int[Array, " n"]]:
    """Equal-weight isotropic Gaussians N(c_k, scale² I) at `circle_centers`; label = mode k."""
    k_label, k_noise = jax.random.split(key)
    labels = jax.random.randint(k_label, (n,), 0, num_modes)
    x = circle_centers(num_modes, radius)[labels] + scale * jax.random.normal(k_noise, (n, 2))
    return x, labels


@functools.partial(jax.jit, static_argnames="n")
def two_moons(key: Key, n: int, noise: float = 0.1) -> tuple[Float[Array, "n 2"], Int[Array, " n"]]:
    """Two interleaved half circles (scikit-learn's `make_moons` geometry), iid labels in {0, 1}.

    Label 0: (cos t, sin t); label 1: (1 − cos t, 0.5 − sin t), t ~ U[0, π], plus N(0, noise²).
    """
    k_label, k_t, k_noise = jax.random.split(key, 3)
    labels = jax.random.bernoulli(k_label, 0.5, (n,)).astype(jnp.int32)
    t = jax.random.uniform(k_t, (n,), maxval=jnp.pi)
    outer = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=-1)
    inner = jnp.stack([1.0 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=-1)
    x = jnp.where(labels[:, None] == 0, outer, inner)
    return x + noise * jax.random.normal(k_noise, (n, 2)), labels


@functools.partial(jax.jit, static_argnames=("n", "num_cells"))
def checkerboard(
    key: Key, n: int, num_cells: int = 4, cell_size: float = 1.0
) -> tuple[Float[Array, "n 2"], Int[Array, " n"]]:
    """Uniform on the dark squares of a `num_cells`² board centred at 0; label = square index.

    The board spans [−num_cells·cell_size/2, num_cells·cell_size/2]²; square (i, j) is dark when
    i + j is even, so there are ⌈num_cells²/2⌉ labels (8 for the usual 4x4 board).
    """
    ij = np.array([(i, j) for i in range(num_cells) for j in range(num_cells) if (i + j) % 2 == 0])
    k_label, k_u = jax.random.split(key)
    labels = jax.random.randint(k_label, (n,), 0, len(ij))
    u = jax.random.uniform(k_u, (n, 2))
    corner = jnp.asarray(ij, dtype=u.dtype)[labels] - num_cells / 2.0
    return cell_size * (corner + u), labels


# ---------------------------------------------------------------------------------------------
# 8x8 digits
# ---------------------------------------------------------------------------------------------


class DigitsSplit(NamedTuple):
    """scikit-learn's 8x8 digits in [−1, 1], images (N, 8, 8, 1) float32, labels (N,) int32."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """The 1797 bundled digits, pixels 0..16 mapped to x/8 − 1, in a fixed stratified split.

    Within each class the images are permuted by a NumPy generator seeded with `seed` and the
    first round(test_fraction · count) go to the test set, so the split is the same on every call
    and every machine; train and test keep the original dataset order.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    labels = digits.target.astype(np.int32)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        is_test[rng.permutation(idx)[: round(test_fraction * len(idx))]] = True
    return DigitsSplit(images[~is_test], labels[~is_test], images[is_test], labels[is_test])


# ---------------------------------------------------------------------------------------------
# Byte-level corpus from the standard library's Python source
# ---------------------------------------------------------------------------------------------

BYTE_VOCAB_SIZE = 256
_EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
)
_SPLITS = ("train", "validation", "test")


def byte_encode(text: str | bytes) -> np.ndarray:
    """UTF-8 bytes of `text` as a uint8 token array (vocabulary 256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).copy()


def byte_decode(tokens: ArrayLike, errors: str = "replace") -> str:
    """Inverse of `byte_encode`; bytes that are not valid UTF-8 follow `errors`."""
    return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors=errors)


def stdlib_source_files(root: str | Path | None = None, max_bytes: int | None = None) -> list[str]:
    """Sorted POSIX relative paths of the `.py` files under `root` (default: the stdlib).

    Directories named test/tests/idle_test/site-packages/dist-packages/__pycache__ are skipped.
    With `max_bytes`, files are taken in sorted order and a file that would push the running
    total past `max_bytes` is skipped, so the total never exceeds it.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place keeps the walk out of site-packages, which can be far larger.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        paths += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    paths.sort()
    if max_bytes is None:
        return paths
    kept, total = [], 0
    for rel in paths:
        size = (root / rel).stat().st_size
        if total + size > max_bytes:
            continue
        kept.append(rel)
        total += size
    return kept


def _unit_hash(name: str) -> float:
    """A platform- and process-independent hash of `name` into [0, 1)."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_files(
    paths: Sequence[str], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)
) -> dict[str, list[str]]:
    """Assign each path to train/validation/test by a SHA-256 hash of the path itself.

    A file's split depends only on its name, never on which other files are present, so capping
    the corpus or adding files never moves a file between splits. Order within a split follows
    `paths`.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three nonnegative numbers summing to 1: {fractions}")
    edges = np.cumsum(fractions)
    out: dict[str, list[str]] = {s: [] for s in _SPLITS}
    for p in paths:
        out[_SPLITS[min(int(np.searchsorted(edges, _unit_hash(p), side="right")), 2)]].append(p)
    return out


class TextCorpus(NamedTuple):
    """Byte-token streams (uint8) per split and the relative paths that produced them."""

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    files: dict[str, list[str]]


def load_stdlib_corpus(
    root: str | Path | None = None,
    max_bytes: int | None = None,
    fractions: tuple[float, float, float] = (0.9, 0.05, 0.05),
) -> TextCorpus:
    """The stdlib's Python source as byte streams, split by file (see `split_files`).

    Each split is the concatenation, in sorted path order, of its files' raw bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    files = split_files(stdlib_source_files(root, max_bytes), fractions)

    def stream(rels: list[str]) -> np.ndarray:
        data = b"".join((root / r).read_bytes() for r in rels)
        return np.frombuffer(data, dtype=np.uint8).copy()

    return TextCorpus(*(stream(files[s]) for s in _SPLITS), files=files)


# ---------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------


def array_batches(
    key: Key, arrays: PyTree, batch_size: int, drop_remainder: bool = True
) -> Iterator[PyTree]:
    """Infinite shuffled minibatches of a pytree of arrays sharing their leading axis.

    Epoch e visits the examples in the order `jax.random.permutation(fold_in(key, e), n)`, so
    each epoch covers every example once (the last n mod batch_size are dropped when
    `drop_remainder`, otherwise yielded as a smaller batch) and a run is reproducible from `key`.
    Leaves are indexed as given: NumPy arrays stay on the host.
    """
    leaves = jax.tree.leaves(arrays)
    n = leaves[0].shape[0]
    if any(leaf.shape[0] != n for leaf in leaves):
        raise ValueError("all arrays must share their leading dimension.")
    if not 0 < batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}.")
    stop = n - n % batch_size if drop_remainder else n
    epoch = 0
    while True:
        perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), n))
        for start in range(0, stop, batch_size):
            idx = perm[start : start + batch_size]
            yield jax.tree.map(lambda a, idx=idx: a[idx], arrays)
        epoch += 1


def token_windows(
    key: Key, tokens: ArrayLike, batch_size: int, seq_len: int
) -> tuple[Int[Array, "b t"], Int[Array, "b t"]]:
    """`batch_size` uniformly placed windows of seq_len + 1 tokens: (w[:, :-1], w[:, 1:]) int32.

    Pure and jit-compatible (batch_size, seq_len static) for a JAX `tokens`; a NumPy `tokens`
    is gathered on the host so a long stream is never copied to the device.
    """
    n = tokens.shape[0]
    if n < seq_len + 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {n}.")
    starts = jax.random.randint(key, (batch_size, 1), 0, n - seq_len)
    if isinstance(tokens, np.ndarray):
        windows = jnp.asarray(tokens[np.asarray(starts) + np.arange(seq_len + 1)[None, :]])
    else:
        windows = jnp.asarray(tokens)[starts + jnp.arange(seq_len + 1)[None, :]]
    windows = windows.astype(jnp.int32)
    return windows[:, :-1], windows[:, 1:]


def token_batches(
    key: Key, tokens: ArrayLike, batch_size: int, seq_len: int
) -> Iterator[tuple[Int[Array, "b t"], Int[Array, "b t"]]]:
    """Infinite `token_windows` batches; step i uses `fold_in(key, i)`."""
    step = 0
    while True:
        yield token_windows(jax.random.fold_in(key, step), tokens, batch_size, seq_len)
        step += 1
