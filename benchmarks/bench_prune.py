"""Time to prune the trained LM per method, and the shared OBS sweep vs a naive per-column solve.

Part 1: every attention/MLP kernel of the cached `train_lm` model (7 kernels) is pruned to 50 %
unstructured and 2:4 by magnitude, Wanda, SparseGPT (float and + 4-bit in the same sweep) and
oBERT (M-FAC, 64 gradients), from the same calibration (64 windows x 128 bytes; oBERT's
gradient collection is timed separately). Columns: cold s (first call, including XLA
compilation), warm s (median of ``--repeats`` further calls), and warm / magnitude warm.

Part 2: SparseGPT's reconstruction of one kernel (the LM's down_proj, d_in = 344, and its
Hessian) computed two ways in float64: the shared `obs_sweep` (one Cholesky factor of H⁻¹,
lazy 128-column blocks), and a naive solve that, at every column j, inverts the remaining
Hessian block H_F afresh (the OBS formula as written) — same masks, same weights to ~1e-10,
and the speed ratio.

    python benchmarks/bench_prune.py
    python benchmarks/bench_prune.py --repeats 3 --methods magnitude sparsegpt
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from _timing import machine_line
from flax import traverse_util

from feynkit.compression import prune
from feynkit.compression.quant import LINEAR_KERNELS, calibrate
from feynkit.experiments.evaluation import consecutive_windows, lm_nll
from feynkit.experiments.zoo import load_lm
from feynkit.tests.compression.prune.test_sparsegpt import sparsegpt_reference

METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt_w4", "obert")


class _LM:
    cache_dir = None
    lm_smoke = False


def _recipe(name, kw):
    if name == "magnitude":
        return prune.magnitude_recipe(**kw)
    if name == "wanda":
        return prune.wanda_recipe(**kw)
    if name == "sparsegpt":
        return prune.sparsegpt_recipe(**kw)
    if name == "sparsegpt_w4":
        return prune.sparsegpt_recipe(bits=4, **kw)
    return prune.obert_recipe(**kw)


def _timed(fn, repeats):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree_util.tree_leaves(out))
    cold = time.perf_counter() - t0
    warm = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(jax.tree_util.tree_leaves(fn()))
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--smoke", action="store_true", help="train_lm's smoke model (quick check)")
    args = ap.parse_args()
    print(machine_line())
    _LM.lm_smoke = args.smoke
    model, params, corpus, lm_ex = load_lm(_LM())
    calib = jnp.asarray(consecutive_windows(corpus.train, 64, 128))
    H = calibrate(model.forward, params, calib, where=LINEAR_KERNELS)
    fisher = None
    if "obert" in args.methods:
        t0 = time.perf_counter()
        win = jnp.asarray(consecutive_windows(corpus.train, 256, 129)).reshape(64, 4, 129)
        fisher = prune.collect_gradients(
            lambda p, w: lm_nll(model.forward, p, w), params, win, LINEAR_KERNELS
        )
        print(
            f"oBERT gradients (64 mini-batches of 4 x 128 bytes): {time.perf_counter() - t0:.2f} s"
        )
    rows = []
    for pattern, kw in (("50%", dict(sparsity=0.5)), ("2:4", dict(n=2, m=4))):
        for name in args.methods:
            r = _recipe(name, kw).with_where(LINEAR_KERNELS)
            calib_ = fisher if name == "obert" else (H if r.needs_calibration else None)
            cold, warm = _timed(
                lambda r=r, c=calib_: prune.prune_tree(params, r, calibration=c), args.repeats
            )
            rows.append((name, pattern, cold, warm))
    print("\n| method | pattern | cold s | warm s | warm / magnitude |")
    print("|---|---|---|---|---|")
    base = {p: w for n, p, _, w in rows if n == "magnitude"}
    for name, pattern, cold, warm in rows:
        ratio = f"{warm / base[pattern]:.1f}x" if pattern in base else "-"
        print(f"| {name} | {pattern} | {cold:.3f} | {warm:.3f} | {ratio} |")

    path = "layers_0/mlp/down_proj/kernel"
    flat = traverse_util.flatten_dict(params, sep="/")
    w = np.asarray(flat[path], np.float64)
    h = np.asarray(H.hessians[path], np.float64)
    print(f"\nOBS sweep vs naive per-column solve, {path} {w.shape}, float64, 50% unstructured:")
    t0 = time.perf_counter()
    block = prune.mask_block(w.shape[0], 128)  # 86 for d_in = 344
    ref, ref_keep = sparsegpt_reference(w, h, 0.5, block=block)
    naive_s = time.perf_counter() - t0
    with jax.enable_x64(True):
        fn = lambda: prune.sparsegpt_prune(jnp.asarray(w), jnp.asarray(h), 0.5)  # noqa: E731
        cold, warm = _timed(fn, max(args.repeats, 3))
        out, keep = fn()
        diff = float(np.max(np.abs(np.asarray(out) - ref)))
        same = bool(np.array_equal(np.asarray(keep), ref_keep))
    print("| solver | seconds | max |Δw| vs naive | same mask |")
    print("|---|---|---|---|")
    print(f"| naive per-column (NumPy, re-inverts H_F) | {naive_s:.3f} | 0 | yes |")
    print(f"| shared obs_sweep (cold, incl. compile) | {cold:.3f} | {diff:.1e} | {same} |")
    print(f"| shared obs_sweep (warm) | {warm:.4f} | {diff:.1e} | {same} |")
    print(f"speed-up (warm): {naive_s / warm:.0f}x")


if __name__ == "__main__":
    main()
