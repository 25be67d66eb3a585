"""Time to quantize the trained LM's linear kernels per method, and their memory vs bf16.

Every attention/MLP kernel of the cached `train_lm` model (14 kernels, 395k weights) is
quantized by each method from the same calibration Hessians (64 windows x 128 bytes). Columns:

* cold s: first run, including XLA compilation; warm s: median of the next `--repeats` runs
  (eora8: the jitted compensation only, on top of GPTQ-W3; svdquant4 jitted per kernel);
* memory: bytes of the arrays as feynkit holds them (codes packed for RTN/GPTQ/SVDQuant; SpQR
  codes and VPTQ indices unpacked), and packed: the bits the format needs
  (`spqr_bits_per_weight`, `vq_bits_per_weight`, QuantizedArray.nbytes);
* ratios: memory / bf16 bytes of the same kernels, and warm time / RTN warm time.

    python benchmarks/bench_quant.py                 # all methods, 2 warm repeats
    python benchmarks/bench_quant.py --repeats 3 --methods rtn4 gptq4
"""

import argparse
import statistics
import time

import jax
import numpy as np
from _timing import machine_line
from flax import traverse_util

from feynkit.compression.quant.calibration import linear_hessians
from feynkit.compression.quant.eora import eora_compensation
from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import dequantize, quantize
from feynkit.compression.quant.smoothquant import activation_absmax
from feynkit.compression.quant.spqr import spqr_bits_per_weight, spqr_quantize
from feynkit.compression.quant.svdquant import svdquant_linear
from feynkit.compression.quant.tree import LINEAR_KERNELS, match_paths
from feynkit.compression.quant.vptq import vptq_quantize, vq_bits_per_weight
from feynkit.experiments.evaluation import consecutive_windows as windows
from feynkit.experiments.evaluation import group_for
from feynkit.experiments.zoo import load_lm

METHODS = ("rtn4", "gptq4", "gptq3", "spqr3", "vptq2", "svdquant4", "eora8")


def _nbytes(tree) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)))


_EORA = jax.jit(eora_compensation, static_argnames="rank")
_SVDQ = jax.jit(svdquant_linear, static_argnames=("rank", "group_size"))


def _runner(name, kernels, H, absmax):
    """() -> (quantized pytree, packed bytes) for one method over all kernels."""

    def run():
        out, packed = {}, 0.0
        for i, (p, w) in enumerate(kernels.items()):
            g = group_for(w.shape[0], 64)
            if name == "rtn4":
                q = quantize(w, 4, group_size=g, symmetric=False)
                packed += q.nbytes
            elif name.startswith("gptq"):
                q = gptq_quantize(w, H[p], int(name[-1]), group_size=g, symmetric=False)
                packed += q.nbytes
            elif name == "spqr3":
                q = spqr_quantize(w, H[p], 3)
                packed += spqr_bits_per_weight(q) * w.size / 8
            elif name == "vptq2":
                q = vptq_quantize(jax.random.key(i), w, H[p], vector_len=4, num_centroids=128)
                packed += vq_bits_per_weight(q) * w.size / 8
            elif name == "svdquant4":
                q = _SVDQ(w, absmax[p], rank=32, group_size=g)
                packed += q.nbytes
            else:  # EoRA rank 8 on top of GPTQ-W3 (time of the compensation only)
                wq = dequantize(gptq_quantize(w, H[p], 3, group_size=g, symmetric=False))
                t0 = time.perf_counter()
                q = jax.block_until_ready(_EORA(w - wq, H[p], rank=8))
                run.eora_seconds += time.perf_counter() - t0
                packed += 2 * q.a.size + 2 * q.b.size
            out[p] = q
        jax.block_until_ready(jax.tree_util.tree_leaves(out))
        return out, packed

    run.eora_seconds = 0.0
    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    class Ex:
        cache_dir, lm_smoke = None, False

    model, params, corpus, _ = load_lm(Ex)
    calib = windows(corpus.train, 64, 128)
    paths = match_paths(params, LINEAR_KERNELS)
    flat = traverse_util.flatten_dict(params, sep="/")
    kernels = {p: jax.numpy.asarray(flat[p], jax.numpy.float32) for p in paths}
    t0 = time.perf_counter()
    H = linear_hessians(model, params, calib, LINEAR_KERNELS)
    from feynkit.compression.quant.calibration import collect_linear_inputs

    xs = collect_linear_inputs(model, params, calib[:16], LINEAR_KERNELS)
    absmax = {p: activation_absmax(xs[p]) for p in paths}
    calib_s = time.perf_counter() - t0
    bf16 = 2 * sum(w.size for w in kernels.values())

    rows = []
    for name in args.methods:
        run = _runner(name, kernels, H, absmax)
        t0 = time.perf_counter()
        out, packed = run()
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(args.repeats):
            run.eora_seconds = 0.0
            t0 = time.perf_counter()
            run()
            warm.append(run.eora_seconds if name == "eora8" else time.perf_counter() - t0)
        rows.append((name, cold, statistics.median(warm), _nbytes(out), packed))

    base = next((r[2] for r in rows if r[0] == "rtn4"), rows[0][2])
    print(f"\n{machine_line()}")
    print(
        f"{len(kernels)} kernels, {bf16 // 2} weights, bf16 {bf16 / 1024:.0f} KiB; "
        f"calibration (Hessians + activation maxima) {calib_s:.1f} s\n"
    )
    print(
        "| method | cold s | warm s | warm / rtn4 | memory KiB | memory / bf16 | packed KiB |"
        " packed / bf16 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, cold, warm, mem, packed in rows:
        print(
            f"| {name} | {cold:.2f} | {warm:.3f} | {warm / base:.1f} | {mem / 1024:.1f} | "
            f"{mem / bf16:.3f} | {packed / 1024:.1f} | {packed / bf16:.3f} |"
        )


if __name__ == "__main__":
    main()
