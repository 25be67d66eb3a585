"""Tests for feynkit.experiments.data: toy sets, digits, the stdlib byte corpus and batching."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.experiments import data
from feynkit.experiments.metrics import mode_weights

CORPUS_CAP = 1_000_000
FRACTIONS = (0.8, 0.1, 0.1)

# --------------------------------------------------------------------------------------------
# Toy sets
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fn", "num_labels"),
    [(data.gaussian_mixture_2d, 8), (data.two_moons, 2), (data.checkerboard, 8)],
)
def test_toy_shapes_labels_determinism_and_jit(fn, num_labels):
    key = jax.random.key(1)
    x, labels = fn(key, 4000)
    assert x.shape == (4000, 2) and labels.shape == (4000,)
    assert jnp.issubdtype(labels.dtype, jnp.integer)
    assert int(labels.min()) == 0 and int(labels.max()) == num_labels - 1
    counts = np.bincount(np.asarray(labels), minlength=num_labels)
    np.testing.assert_allclose(counts / 4000, 1 / num_labels, atol=0.03)
    # The generators are jitted themselves (n static); a second call reuses the compilation.
    x2, labels2 = fn(key, 4000)
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(labels, labels2)
    x3, _ = fn(jax.random.key(2), 4000)
    assert not np.allclose(x, x3)


def test_gaussian_mixture_modes_match_labels():
    x, labels = data.gaussian_mixture_2d(jax.random.key(0), 4000, radius=4.0, scale=0.5)
    np.testing.assert_allclose(mode_weights(x, data.circle_centers(8, 4.0)), 1 / 8, atol=0.03)
    x, labels = np.asarray(x), np.asarray(labels)
    centers = np.asarray(data.circle_centers(8, 4.0))
    np.testing.assert_allclose(np.linalg.norm(centers, axis=1), 4.0, rtol=1e-6)
    for k in range(8):
        np.testing.assert_allclose(x[labels == k].mean(0), centers[k], atol=0.1)
    # The modes are well separated: the nearest center is the label.
    nearest = np.argmin(np.sum((x[:, None, :] - centers[None, :, :]) ** 2, -1), axis=1)
    assert np.mean(nearest == labels) > 0.99


def test_two_moons_noise_free_geometry():
    x, labels = map(np.asarray, data.two_moons(jax.random.key(0), 4000, noise=0.0))
    outer, inner = x[labels == 0], x[labels == 1]
    np.testing.assert_allclose(np.linalg.norm(outer, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        np.linalg.norm(inner - np.array([[1.0, 0.5]]), axis=1), 1.0, atol=1e-5
    )
    assert outer[:, 1].min() >= -1e-6 and inner[:, 1].max() <= 0.5 + 1e-6


def test_checkerboard_points_on_dark_squares():
    x, labels = map(np.asarray, data.checkerboard(jax.random.key(0), 4000, 4, 1.0))
    assert np.abs(x).max() <= 2.0
    cell = np.floor(x + 2.0).astype(int)
    assert np.all(cell.sum(1) % 2 == 0)
    # A label is one square: all its points share a cell.
    for k in range(8):
        assert len({tuple(c) for c in cell[labels == k]}) == 1


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


@functools.cache
def _digits():
    return data.load_digits_split()


def test_digits_shapes_range_and_total():
    d = _digits()
    assert len(d.x_train) + len(d.x_test) == 1797
    assert d.x_train.shape[1:] == (8, 8, 1) and d.x_test.shape[1:] == (8, 8, 1)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    allx = np.concatenate([d.x_train, d.x_test])
    assert allx.min() == -1.0 and allx.max() == 1.0
    for y in (d.y_train, d.y_test):
        assert set(np.unique(y)) == set(range(10))
    assert abs(len(d.x_test) - 0.2 * 1797) <= 10


def test_digits_split_deterministic_and_disjoint():
    d, again = _digits(), data.load_digits_split()
    for a, b in zip(d, again, strict=True):
        np.testing.assert_array_equal(a, b)
    # Disjoint and exhaustive: the multiset of (image, label) rows is the whole dataset.
    from sklearn.datasets import load_digits

    full = load_digits()
    rows = lambda x, y: sorted(map(bytes, np.concatenate([x.reshape(len(x), -1), y[:, None]], 1)))
    ref_x = (full.images.astype(np.float32) / 8 - 1)[..., None]
    both = rows(np.concatenate([d.x_train, d.x_test]), np.concatenate([d.y_train, d.y_test]))
    assert both == rows(ref_x, full.target.astype(np.int32))
    other = data.load_digits_split(seed=1)
    assert not np.array_equal(other.y_test, d.y_test)


# --------------------------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------------------------


def test_source_files_exclusions_and_cap(tmp_path):
    for rel, text in {
        "a.py": "a = 1\n",
        "pkg/__init__.py": "",
        "pkg/b.py": "b = 2\n" * 10,
        "pkg/tests/t.py": "x",
        "test/t.py": "x",
        "idlelib/idle_test/t.py": "x",
        "site-packages/numpy/n.py": "x",
        "notes.txt": "x",
    }.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert data.stdlib_source_files(tmp_path) == ["a.py", "pkg/__init__.py", "pkg/b.py"]
    assert data.stdlib_source_files(tmp_path, max_bytes=10) == ["a.py", "pkg/__init__.py"]


def test_stdlib_files_sorted_deterministic_capped():
    files = data.stdlib_source_files(max_bytes=CORPUS_CAP)
    assert files == sorted(files) and files == data.stdlib_source_files(max_bytes=CORPUS_CAP)
    assert len(files) > 20 and all(f.endswith(".py") for f in files)
    excluded = {"test", "tests", "site-packages"}
    assert not any(excluded & set(f.split("/")[:-1]) for f in files)


def test_split_by_file_disjoint_stable_and_deterministic():
    files = data.stdlib_source_files(max_bytes=CORPUS_CAP)
    split = data.split_files(files, FRACTIONS)
    assert split == data.split_files(files, FRACTIONS)
    parts = [set(split[s]) for s in ("train", "validation", "test")]
    assert all(parts) and set.union(*parts) == set(files)
    assert sum(map(len, parts)) == len(files)
    # A file's split depends only on its own path.
    sub = data.split_files(files[::3], FRACTIONS)
    for s in sub:
        assert set(sub[s]) <= set(split[s])
    with pytest.raises(ValueError):
        data.split_files(files, (0.5, 0.2, 0.2))


def test_corpus_streams_match_files():
    import sysconfig
    from pathlib import Path

    corpus = data.load_stdlib_corpus(max_bytes=CORPUS_CAP, fractions=FRACTIONS)
    again = data.load_stdlib_corpus(max_bytes=CORPUS_CAP, fractions=FRACTIONS)
    assert corpus.files == again.files
    np.testing.assert_array_equal(corpus.validation, again.validation)
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for name in ("train", "validation", "test"):
        stream = getattr(corpus, name)
        assert stream.dtype == np.uint8
        expected = b"".join((root / f).read_bytes() for f in corpus.files[name])
        assert stream.tobytes() == expected
        total += len(stream)
    assert 0 < total <= CORPUS_CAP


def test_byte_tokenizer_round_trip():
    text = "def f(x):\n    return 'Fréchet → ∑ 🐍'\n"
    tokens = data.byte_encode(text)
    assert tokens.dtype == np.uint8 and len(tokens) == len(text.encode("utf-8"))
    assert data.byte_decode(tokens) == text
    assert data.byte_decode(jnp.asarray(tokens)) == text
    all_bytes = bytes(range(data.BYTE_VOCAB_SIZE))
    np.testing.assert_array_equal(data.byte_encode(all_bytes), np.arange(256))
    assert (
        data.byte_decode(data.byte_encode(all_bytes), errors="surrogateescape").encode(
            "utf-8", errors="surrogateescape"
        )
        == all_bytes
    )


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------


def _take(it, k):
    return [next(it) for _ in range(k)]


def test_array_batches_deterministic_and_cover_each_epoch():
    n, bs = 20, 5
    arrays = {"x": np.arange(n) * 10, "y": np.arange(n)}
    key = jax.random.key(3)
    first = _take(data.array_batches(key, arrays, bs), 8)
    second = _take(data.array_batches(key, arrays, bs), 8)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a["y"], b["y"])
    for b in first:
        assert b["y"].shape == (bs,)
        np.testing.assert_array_equal(b["x"], b["y"] * 10)
    epoch0 = np.concatenate([b["y"] for b in first[:4]])
    epoch1 = np.concatenate([b["y"] for b in first[4:]])
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
    assert not np.array_equal(epoch0, epoch1)
    other = _take(data.array_batches(jax.random.key(4), arrays, bs), 4)
    assert not np.array_equal(epoch0, np.concatenate([b["y"] for b in other]))


def test_array_batches_remainder():
    x = np.arange(7)
    kept = _take(data.array_batches(jax.random.key(0), x, 3, drop_remainder=False), 3)
    assert [len(b) for b in kept] == [3, 3, 1]
    np.testing.assert_array_equal(np.sort(np.concatenate(kept)), x)
    dropped = _take(data.array_batches(jax.random.key(0), x, 3), 3)
    assert [len(b) for b in dropped] == [3, 3, 3]
    with pytest.raises(ValueError):
        next(data.array_batches(jax.random.key(0), (x, np.arange(6)), 2))


def test_token_windows_contiguous_shifted_and_jittable():
    tokens = np.arange(1000, dtype=np.int32)
    key = jax.random.key(5)
    inputs, targets = data.token_windows(key, tokens, 16, 32)
    assert inputs.shape == targets.shape == (16, 32) and inputs.dtype == jnp.int32
    np.testing.assert_array_equal(targets, inputs + 1)
    np.testing.assert_array_equal(inputs[:, 1:], inputs[:, :-1] + 1)
    assert int(inputs.min()) >= 0 and int(targets.max()) <= 999
    jitted = jax.jit(data.token_windows, static_argnums=(2, 3))(key, jnp.asarray(tokens), 16, 32)
    np.testing.assert_array_equal(jitted[0], inputs)
    np.testing.assert_array_equal(jitted[1], targets)


def test_token_windows_reach_both_ends():
    tokens = np.arange(10, dtype=np.uint8)
    inputs, targets = data.token_windows(jax.random.key(0), tokens, 400, 8)
    assert set(np.asarray(inputs[:, 0]).tolist()) == {0, 1}
    assert int(targets.max()) == 9
    with pytest.raises(ValueError):
        data.token_windows(jax.random.key(0), tokens, 1, 10)


def test_token_batches_deterministic():
    tokens = data.byte_encode("the quick brown fox jumps over the lazy dog " * 20)
    a = _take(data.token_batches(jax.random.key(7), tokens, 4, 16), 3)
    b = _take(data.token_batches(jax.random.key(7), tokens, 4, 16), 3)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, yb)
    assert not np.array_equal(a[0][0], a[1][0])
