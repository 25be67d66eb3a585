"""VPTQ: vector post-training quantization with k-means codebooks and OBS error feedback.

Layout (as in the reference code's "transposed" mode): the kernel W (d_in, d_out) (Flax layout)
is cut into vectors of ``v`` consecutive output channels of one input row j,
w_{j,m} = W[j, m·v:(m+1)·v], so that every vector belongs to a single input column of the
reference (out, in) layout and the GPTQ/OBS column sweep applies unchanged. Each vector is stored
as the index of its nearest centroid of a codebook C (k × v, fp16), optionally plus the index of
a residual codebook C_r for what C leaves over (residual VQ):

    ŵ_{j,m} = C[i_{j,m}] + C_r[i'_{j,m}],
    i = argmin_c ‖w_{j,m} − C_c‖,   i' = argmin_c ‖w_{j,m} − C[i] − C_{r,c}‖.

Codebooks come from (weighted) k-means on the vectors. With a Hessian H = 2/n Σ x xᵀ the
objective tr((W − Ŵ)ᵀ H (W − Ŵ)) is approximated by its diagonal, so vector w_{j,m} gets the
weight H_jj in k-means (Hessian-weighted centroids: C_c = Σ h_i w_i / Σ h_i), and the rows are
then quantized in order with OBS compensation (`feynkit.compression.hessian.obs_sweep`): after
fixing row j the error (w_j − ŵ_j)/U_jj is spread onto the later rows with the Cholesky factor U
of H⁻¹, exactly as GPTQ does for scalars. The residual codebook is fit on the errors of that
first sweep, and a second sweep quantizes with both codebooks.

Bits per weight = (log₂k + log₂k_r)/v + 16·v·(k + k_r)/(d_in·d_out) (indices + fp16 codebooks).

Not implemented from the paper: channel-independent second-order *codebook* refinement beyond
the diagonal weighting, outlier-column codebooks, per-column normalisation (``enable_norm``),
the Hessian-based column permutation, and layer-wise / end-to-end fine-tuning.

References:
  Liu et al. (2024), "VPTQ: Extreme Low-bit Vector Post-Training Quantization for Large Language
  Models", EMNLP (reference code: microsoft/VPTQ, vptq.py, quantizer.py);
  Arthur & Vassilvitskii (2007), "k-means++: The Advantages of Careful Seeding".
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from feynkit.compression.hessian import inverse_hessian_cholesky, obs_sweep
from feynkit.compression.protocol import CompressedTensor, array_bits
from feynkit.core.types import Array, ArrayLike, Float, Int, Key

__all__ = [
    "KMeansResult",
    "VQArray",
    "kmeans",
    "vq_assign",
    "vq_bits_per_weight",
    "vq_dequantize",
    "vptq_quantize",
]


class KMeansResult(NamedTuple):
    """centroids (k, v), labels (n,) int32, inertia Σ_i h_i ‖x_i − C_{label_i}‖² (scalar)."""

    centroids: Array
    labels: Array
    inertia: Array


def _sq_dists(x, c):
    """‖x_i − c_k‖² for all pairs, (n, k), via the expansion (one matmul)."""
    xx = jnp.sum(x * x, axis=1, keepdims=True)
    cc = jnp.sum(c * c, axis=1)[None, :]
    return jnp.maximum(xx - 2.0 * jnp.matmul(x, c.T, precision=lax.Precision.HIGHEST) + cc, 0.0)


def vq_assign(x: Float[ArrayLike, "n v"], centroids: Float[ArrayLike, "k v"]) -> Int[Array, " n"]:
    """Index of the nearest centroid (Euclidean) of each row of ``x``."""
    x = jnp.asarray(x, jnp.float32)
    return jnp.argmin(_sq_dists(x, jnp.asarray(centroids, jnp.float32)), axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("k", "init"))
def _kmeans(key, x, w, num_iters, *, k, init):
    n = x.shape[0]
    k_init, k_rand = jax.random.split(key)
    if init == "random":
        idx = jax.random.choice(k_rand, n, (k,), replace=False, p=w / jnp.sum(w))
        c0 = x[idx]
    else:  # k-means++ (D² weighting, times the sample weights)
        keys = jax.random.split(k_init, k)
        first = jax.random.categorical(keys[0], jnp.log(w))
        c0 = jnp.zeros((k, x.shape[1]), x.dtype).at[0].set(x[first])
        d2 = jnp.sum((x - x[first][None, :]) ** 2, axis=1)

        def seed(i, carry):
            c, d2 = carry
            logits = jnp.log(jnp.maximum(w * d2, 1e-30)) + jnp.where(d2 > 0, 0.0, -jnp.inf)
            logits = jnp.where(jnp.any(d2 > 0), logits, jnp.zeros_like(logits))
            pick = jax.random.categorical(keys[i], logits)
            c = c.at[i].set(x[pick])
            return c, jnp.minimum(d2, jnp.sum((x - x[pick][None, :]) ** 2, axis=1))

        c0, _ = lax.fori_loop(1, k, seed, (c0, d2))

    def lloyd(_, c):
        lab = jnp.argmin(_sq_dists(x, c), axis=1)
        sums = jax.ops.segment_sum(w[:, None] * x, lab, num_segments=k)
        mass = jax.ops.segment_sum(w, lab, num_segments=k)
        return jnp.where(mass[:, None] > 0, sums / jnp.maximum(mass, 1e-30)[:, None], c)

    c = lax.fori_loop(0, num_iters, lloyd, c0)
    lab = jnp.argmin(_sq_dists(x, c), axis=1).astype(jnp.int32)
    inertia = jnp.sum(w * jnp.sum((x - c[lab]) ** 2, axis=1))
    return KMeansResult(c, lab, inertia)


def kmeans(
    key: Key,
    x: Float[ArrayLike, "n v"],
    k: int,
    *,
    weights: Float[ArrayLike, " n"] | None = None,
    num_iters: int = 25,
    init: str = "kmeans++",
) -> KMeansResult:
    """Weighted k-means (Lloyd's algorithm), seeded by k-means++ or a weighted random draw.

    Minimises Σ_i h_i ‖x_i − C_{a(i)}‖²: assignment a(i) = argmin_c ‖x_i − C_c‖², update
    C_c = Σ_{a(i)=c} h_i x_i / Σ_{a(i)=c} h_i (an empty cluster keeps its centroid). The whole
    run is one jitted `lax.fori_loop`; the same key gives the same codebook.

    Args:
      key: PRNG key for the seeding.
      x: points (n, v). k: number of centroids (≤ n).
      weights: h_i > 0 (None: all ones), e.g. the Hessian diagonal of each vector's input.
      num_iters: Lloyd iterations. init: "kmeans++" or "random".

    Returns:
      `KMeansResult(centroids (k, v), labels (n,), inertia)`.

    References:
      Lloyd (1982); Arthur & Vassilvitskii (2007), k-means++.
    """
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
        raise ValueError(f"x must be (n, v) points, got shape {x.shape}.")
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of points {x.shape[0]}.")
    if init not in ("kmeans++", "random"):
        raise ValueError(f"init={init!r}: use 'kmeans++' or 'random'.")
    w = jnp.ones((x.shape[0],), jnp.float32) if weights is None else jnp.asarray(weights)
    if w.shape != (x.shape[0],):
        raise ValueError(f"weights must have shape ({x.shape[0]},), got {w.shape}.")
    return _kmeans(key, x, w.astype(jnp.float32), jnp.int32(num_iters), k=int(k), init=init)


@struct.dataclass
class VQArray(CompressedTensor):
    """A kernel (d_in, d_out) stored as codebook indices of length-v output-channel vectors.

    Protocol storage (``nbits``): indices at ⌈log₂k⌉ bits, codebooks at their stored dtype
    (fp16), i.e. `vq_bits_per_weight` with its default ``codebook_bits=16``.

    Attributes:
      indices: (d_in, d_out // v) int32 (log₂k bits each when packed).
      codebook: (k, v) float16.
      res_indices, res_codebook: the residual stage, or None.
      dtype: dtype of the dequantized kernel.
    """

    indices: Array
    codebook: Array
    res_indices: Array | None = None
    res_codebook: Array | None = None
    dtype: np.dtype = struct.field(pytree_node=False, default=np.dtype(np.float32))

    @property
    def vector_len(self) -> int:
        return self.codebook.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        return self.indices.shape[0], self.indices.shape[1] * self.vector_len

    @property
    def nbits(self) -> int:
        books = [self.codebook] + ([] if self.res_codebook is None else [self.res_codebook])
        per_vector = sum(math.ceil(math.log2(max(b.shape[0], 2))) for b in books)
        return int(self.indices.size * per_vector + array_bits(*books))

    def dequantize(self) -> Float[Array, "d_in d_out"]:
        return vq_dequantize(self)


def vq_dequantize(q: VQArray) -> Float[Array, "d_in d_out"]:
    """Ŵ[j, m·v:(m+1)·v] = C[i_{j,m}] (+ C_r[i'_{j,m}])."""
    w = jnp.take(q.codebook.astype(jnp.float32), q.indices, axis=0)
    if q.res_codebook is not None:
        w = w + jnp.take(q.res_codebook.astype(jnp.float32), q.res_indices, axis=0)
    return w.reshape(q.shape).astype(q.dtype)


def vq_bits_per_weight(q: VQArray, codebook_bits: int = 16) -> float:
    """(log₂k + log₂k_r)/v + codebook_bits·v·(k + k_r)/(d_in·d_out), indices at ⌈log₂k⌉ bits."""
    books = [q.codebook] + ([] if q.res_codebook is None else [q.res_codebook])
    numel = q.shape[0] * q.shape[1]
    idx_bits = sum(math.ceil(math.log2(max(b.shape[0], 2))) for b in books) / q.vector_len
    return idx_bits + sum(codebook_bits * b.size for b in books) / numel


@functools.partial(
    jax.jit,
    static_argnames=("percdamp", "v", "k", "k_res", "iters", "weighted", "use_obs", "block_size"),
)
def _vptq(key, w, H, *, percdamp, v, k, k_res, iters, weighted, use_obs, block_size):
    d_in, d_out = w.shape
    W = w.astype(jnp.float32)
    h = jnp.diagonal(H).astype(jnp.float32)
    dead = h == 0
    W = jnp.where(dead[:, None], 0.0, W)
    vec_w = jnp.repeat(jnp.where(dead, 1e-8, h), d_out // v) if weighted else None
    k1, k2 = jax.random.split(key)
    fit = functools.partial(_kmeans, num_iters=iters, init="kmeans++")
    ones = jnp.ones((d_in * d_out // v,), jnp.float32)
    book = fit(k1, W.reshape(-1, v), ones if vec_w is None else vec_w, k=k).centroids
    book = book.astype(jnp.float16).astype(jnp.float32)
    U = inverse_hessian_cholesky(H, percdamp) if use_obs else None

    def sweep(column_fn):
        if not use_obs:  # plain nearest-codebook assignment, row by row (no error feedback)
            q, ex = jax.vmap(lambda row: column_fn(row, 0))(W)
            return q, jax.tree_util.tree_map(lambda a: a.T, ex)
        # obs_sweep works on the reference (out, in) layout: columns are our rows j.
        q, _, ex = obs_sweep(W.T, U, column_fn, block_size, has_aux=True)
        return q.T, ex

    def first(col, _j):
        i = vq_assign(col.reshape(-1, v), book)
        q = book[i].reshape(-1)
        return q, (i, col - q)

    q, (idx, err) = sweep(first)
    res_book = res_idx = None
    if k_res:
        res_book = fit(k2, err.T.reshape(-1, v), ones if vec_w is None else vec_w, k=k_res)
        res_book = res_book.centroids.astype(jnp.float16).astype(jnp.float32)

        def second(col, _j):
            vec = col.reshape(-1, v)
            i = vq_assign(vec, book)
            r = vq_assign(vec - book[i], res_book)
            return (book[i] + res_book[r]).reshape(-1), (i, r)

        q, (idx, res_idx) = sweep(second)
        res_idx = res_idx.T
        res_book = res_book.astype(jnp.float16)
    return q, idx.T, book.astype(jnp.float16), res_idx, res_book


def vptq_quantize(
    key: Key,
    w: Float[ArrayLike, "d_in d_out"],
    H: Float[ArrayLike, "d_in d_in"] | None = None,
    *,
    vector_len: int = 4,
    num_centroids: int = 256,
    num_res_centroids: int = 0,
    kmeans_iters: int = 25,
    hessian_weighted: bool = True,
    use_obs: bool = True,
    percdamp: float = 0.01,
    block_size: int = 128,
) -> VQArray:
    """Vector-quantize a kernel: (Hessian-weighted) k-means codebook, OBS sweep, residual VQ.

    Steps: (1) k-means on the vectors w_{j,m} with weights H_jj; (2) sweep the rows j in order,
    ŵ_j = nearest centroids, spreading (w_j − ŵ_j)/U_jj onto later rows (skipped without H or
    with ``use_obs=False``); (3) if ``num_res_centroids``: k-means on the first sweep's errors,
    then a second sweep with ŵ = C[i] + C_r[i'].

    Args:
      key: PRNG key for the k-means seeding.
      w: kernel (d_in, d_out), Flax layout; d_out must be a multiple of ``vector_len``.
      H: (d_in, d_in) Hessian 2/n Σ x xᵀ (`linear_hessians`); None: plain k-means VQ.
      vector_len: v. num_centroids: k. num_res_centroids: k_r (0: no residual stage).
      kmeans_iters: Lloyd iterations per codebook. hessian_weighted: weight vectors by H_jj.
      use_obs: OBS error feedback across rows (needs H). percdamp, block_size: as in GPTQ.

    Returns:
      A `VQArray`; `vq_dequantize` gives the kernel, `vq_bits_per_weight` its storage cost.

    References:
      Liu et al. (2024), "VPTQ", Sec. 4 (Alg. 1, Hessian-weighted centroid initialisation,
      residual VQ).
    """
    w = jnp.asarray(w)
    if w.ndim != 2:
        raise ValueError(f"w must be a (d_in, d_out) kernel, got shape {w.shape}.")
    d_in, d_out = w.shape
    if vector_len < 1 or d_out % vector_len:
        raise ValueError(
            f"vector_len={vector_len} must divide d_out={d_out} (vectors run along the outputs)."
        )
    n_vec = d_in * d_out // vector_len
    for name, kk in (("num_centroids", num_centroids), ("num_res_centroids", num_res_centroids)):
        if kk < 0 or kk > n_vec or (name == "num_centroids" and kk < 1):
            raise ValueError(f"{name}={kk} must be in [1, {n_vec}] (the number of vectors).")
    if H is None:
        H = jnp.eye(d_in, dtype=jnp.float32)
        hessian_weighted = use_obs = False
    H = jnp.asarray(H, jnp.float32)
    if H.shape != (d_in, d_in):
        raise ValueError(f"H must be ({d_in}, {d_in}) for a kernel {w.shape}, got {H.shape}.")
    q, idx, book, res_idx, res_book = _vptq(
        key,
        w,
        H,
        percdamp=float(percdamp),
        v=int(vector_len),
        k=int(num_centroids),
        k_res=int(num_res_centroids),
        iters=int(kmeans_iters),
        weighted=bool(hessian_weighted),
        use_obs=bool(use_obs),
        block_size=int(block_size),
    )
    del q
    return VQArray(idx, book, res_idx, res_book, np.dtype(w.dtype))
