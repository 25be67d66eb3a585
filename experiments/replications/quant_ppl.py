"""Replication: weight-only quantization of the trained byte-level LM — perplexity vs bits.

Every attention and MLP kernel of the `train_lm` TransformerLM (embeddings, norms and lm_head
stay in float) is quantized by

* RTN: asymmetric round-to-nearest, W8/W4/W3/W2, groups of ~64 inputs;
* GPTQ: the same grids with second-order rounding (`gptq_quantize`, act order off), plus
  3-bit GPTQ in SpQR's groups of 16 (the equal-bits comparison point for SpQR);
* SpQR: 3-bit codes in groups of 16, 3-bit bilevel statistics, fp16 outliers;
* VPTQ: length-4 vectors, a 128-entry fp16 codebook per matrix (~2 bits incl. the codebook);

and, for some of them, compensated by an EoRA low-rank path (rank 8, fp16). Calibration: the
Hessians H = 2/n Σ x xᵀ of all kernels on `calib_windows` windows of the training split,
computed once on the float model (not layer-sequentially). The group of a kernel is the largest
divisor of its input width ≤ the target (64 → 64 for d_in = 128, 43 for d_in = 344).

Reported per method: validation perplexity (first `eval_tokens` bytes of the validation split),
average bits per quantized weight, and the held-out relative layer-output error
e = tr(ΔWᵀ H ΔW) / tr(Wᵀ H W) (mean over kernels, H from validation windows after the scored
ones). Bits: RTN/GPTQ b + (16 + b)/g (fp16 scale, b-bit zero per group, the GPTQ convention);
SpQR and VPTQ count their stored arrays (`spqr_bits_per_weight`, `vq_bits_per_weight`); EoRA
adds 16·r·(d_in + d_out) bits per kernel. Float weights are counted as 16 bits (bf16).

References: Frantar et al. (2023) GPTQ; Dettmers et al. (2024) SpQR; Liu et al. (2024) VPTQ;
Liu et al. (2024) EoRA.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from feynkit.compression.quant.calibration import linear_hessians
from feynkit.compression.quant.eora import eora_compensation, svd_compensation
from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import dequantize, fake_quantize
from feynkit.compression.quant.spqr import spqr_bits_per_weight, spqr_dequantize, spqr_quantize
from feynkit.compression.quant.tree import LINEAR_KERNELS, match_paths
from feynkit.compression.quant.vptq import vptq_quantize, vq_bits_per_weight, vq_dequantize
from feynkit.experiments import train as tr
from feynkit.experiments.evaluation import consecutive_windows, group_for, lm_nll_fn
from feynkit.experiments.replications import register
from feynkit.experiments.results import Results
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class QuantPPLConfig:
    name: str = "quant_ppl"
    cache_dir: str | None = None  # model cache of the trained LM
    lm_smoke: bool = False  # use train_lm's smoke model (set by smoke=true)
    calib_windows: int = 64
    calib_len: int = 128
    heldout_windows: int = 32
    eval_tokens: int = 16384
    group_size: int = 64  # RTN/GPTQ target group (largest divisor of d_in ≤ this)
    rtn_bits: list[int] = dataclasses.field(default_factory=lambda: [8, 4, 3, 2])
    gptq_bits: list[int] = dataclasses.field(default_factory=lambda: [4, 3])
    spqr_bits: int = 3
    spqr_group_size: int = 16
    spqr_outlier_threshold: float = 0.2
    gptq_small_group: int = 16  # GPTQ at SpQR's bits and group: the equal-bits comparison
    vptq_vector_len: int = 4
    vptq_centroids: int = 128
    vptq_res_centroids: int = 0
    kmeans_iters: int = 20
    eora_rank: int = 8
    eora_methods: list[str] = dataclasses.field(
        default_factory=lambda: ["rtn3", "gptq3", "spqr3", "vptq"]
    )
    near_lossless: float = 1.01  # claim: SpQR ppl / float ppl below this


SMOKE = dict(
    lm_smoke=True,
    calib_windows=8,
    calib_len=32,
    heldout_windows=8,
    eval_tokens=2048,
    group_size=16,
    rtn_bits=[4, 3, 2],
    vptq_centroids=16,
    kmeans_iters=5,
    eora_rank=4,
)


_eora = jax.jit(eora_compensation, static_argnames="rank")
_svd = jax.jit(svd_compensation, static_argnames="rank")


def with_kernels(params, kernels: dict):
    """`params` with the '/'-joined kernel paths replaced."""
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update({p: jnp.asarray(k, flat[p].dtype) for p, k in kernels.items()})
    return traverse_util.unflatten_dict(flat, sep="/")


def rel_layer_error(w, wh, H) -> float:
    """tr(ΔWᵀ H ΔW) / tr(Wᵀ H W): the relative output error on the inputs behind H."""
    w, d = np.asarray(w, np.float64), np.asarray(w, np.float64) - np.asarray(wh, np.float64)
    H = np.asarray(H, np.float64)
    return float(np.sum(d * (H @ d)) / np.sum(w * (H @ w)))


def _methods(ex, kernels, H, key):
    """name → (dequantized kernels, total bits)."""
    out = {}
    for b in ex.rtn_bits:
        qs, bits = {}, 0.0
        for p, w in kernels.items():
            g = group_for(w.shape[0], ex.group_size)
            qs[p] = fake_quantize(w, b, group_size=g, axis=0, symmetric=False)
            bits += w.size * (b + (16 + b) / g)
        out[f"rtn{b}"] = (qs, bits)
    grids = [(f"gptq{b}", b, ex.group_size) for b in ex.gptq_bits]
    grids.append((f"gptq{ex.spqr_bits}_g{ex.gptq_small_group}", ex.spqr_bits, ex.gptq_small_group))
    for name, b, target in grids:
        qs, bits = {}, 0.0
        for p, w in kernels.items():
            g = group_for(w.shape[0], target)
            qs[p] = dequantize(gptq_quantize(w, H[p], b, group_size=g, symmetric=False))
            bits += w.size * (b + (16 + b) / g)
        out[name] = (qs, bits)
    qs, bits = {}, 0.0
    for p, w in kernels.items():
        q = spqr_quantize(
            w,
            H[p],
            ex.spqr_bits,
            group_size=ex.spqr_group_size,
            outlier_threshold=ex.spqr_outlier_threshold,
        )
        qs[p], bits = spqr_dequantize(q), bits + w.size * spqr_bits_per_weight(q)
    out[f"spqr{ex.spqr_bits}"] = (qs, bits)
    qs, bits = {}, 0.0
    for i, (p, w) in enumerate(kernels.items()):
        q = vptq_quantize(
            jax.random.fold_in(key, i),
            w,
            H[p],
            vector_len=ex.vptq_vector_len,
            num_centroids=ex.vptq_centroids,
            num_res_centroids=ex.vptq_res_centroids,
            kmeans_iters=ex.kmeans_iters,
        )
        qs[p], bits = vq_dequantize(q), bits + w.size * vq_bits_per_weight(q)
    out["vptq"] = (qs, bits)
    return out


@register("quant_ppl", QuantPPLConfig)
def run(cfg, out_dir: Path) -> Results:
    ex = tr.experiment_config(cfg, QuantPPLConfig, SMOKE)
    res = Results("quant_ppl", cfg.seed)
    key = jax.random.key(cfg.seed)
    model, params, corpus, lm_ex = load_lm(ex)
    calib = consecutive_windows(corpus.train, ex.calib_windows, ex.calib_len)
    val = corpus.validation
    heldout = consecutive_windows(val, ex.heldout_windows, ex.calib_len, start=ex.eval_tokens + 1)
    paths = match_paths(params, LINEAR_KERNELS)
    flat = traverse_util.flatten_dict(params, sep="/")
    kernels = {p: jnp.asarray(flat[p], jnp.float32) for p in paths}
    n_weights = sum(w.size for w in kernels.values())
    t0 = time.perf_counter()
    H = linear_hessians(model, params, calib, LINEAR_KERNELS)
    H_test = linear_hessians(model, params, heldout, LINEAR_KERNELS)
    res.metric("calibration_seconds", time.perf_counter() - t0)
    nll = lm_nll_fn(model.forward, val[: ex.eval_tokens + 1], lm_ex.seq_len)
    ppl = {"float": math.exp(nll(params))}
    res.metric("float.ppl", ppl["float"])
    res.metric("float.bits", 16.0)

    def record(name, qs, bits, seconds):
        ppl[name] = res.metric(f"{name}.ppl", math.exp(nll(with_kernels(params, qs))))
        res.metric(f"{name}.bits", bits / n_weights)
        errs = [rel_layer_error(kernels[p], qs[p], H_test[p]) for p in paths]
        res.metric(f"{name}.layer_error", float(np.mean(errs)))
        res.metric(f"{name}.seconds", seconds)
        print(
            f"{name:>12}: ppl {ppl[name]:.4f}  bits {bits / n_weights:.3f}  "
            f"layer err {np.mean(errs):.2e}  ({seconds:.1f} s)",
            flush=True,
        )

    t0 = time.perf_counter()
    methods = _methods(ex, kernels, H, key)
    res.metric("quantize_seconds", time.perf_counter() - t0)
    for name, (qs, bits) in methods.items():
        record(name, qs, bits, 0.0)
    r = ex.eora_rank
    for name in ex.eora_methods:
        qs, bits = methods[name]
        t0 = time.perf_counter()
        comp = {p: _eora(kernels[p] - qs[p], H[p], rank=r) for p in paths}
        extra = sum(16 * r * sum(kernels[p].shape) for p in paths)
        fixed = {p: qs[p] + comp[p].a @ comp[p].b for p in paths}
        record(f"{name}+eora", fixed, bits + extra, time.perf_counter() - t0)
        svd = {p: _svd(kernels[p] - qs[p], rank=r) for p in paths}
        svd_err = [
            rel_layer_error(kernels[p], qs[p] + svd[p].a @ svd[p].b, H_test[p]) for p in paths
        ]
        res.metric(f"{name}+svd.layer_error", float(np.mean(svd_err)))
        res.claim(f"EoRA lowers {name} perplexity", ppl[f"{name}+eora"], ppl[name])
        res.claim(
            f"EoRA {name} held-out layer error < SVD compensation's (rank {r})",
            res.metrics[f"{name}+eora.layer_error"],
            res.metrics[f"{name}+svd.layer_error"],
        )
    for b in ex.gptq_bits:
        if b in ex.rtn_bits and b in (3, 4):
            res.claim(f"GPTQ-W{b} perplexity < RTN-W{b}", ppl[f"gptq{b}"], ppl[f"rtn{b}"])
    sp = f"spqr{ex.spqr_bits}"
    sp_bits = res.metrics[f"{sp}.bits"]
    gptqs = [m for m in methods if m.startswith("gptq")]
    cmp = [m for m in gptqs if res.metrics[f"{m}.bits"] >= sp_bits]
    if cmp:
        ref = min(cmp, key=lambda m: res.metrics[f"{m}.bits"])
        ref_bits = res.metrics[f"{ref}.bits"]
        # The GPTQ configuration with the fewest bits among those with at least SpQR's bits.
        res.claim(
            f"SpQR ({sp_bits:.2f} bits) perplexity <= {ref} ({ref_bits:.2f} bits)",
            ppl[sp],
            ppl[ref],
            "<=",
        )
    small = f"gptq{ex.spqr_bits}_g{ex.gptq_small_group}"
    small_bits = res.metrics[f"{small}.bits"]
    res.claim(
        f"SpQR perplexity < {small} (GPTQ in SpQR's groups, {small_bits:.2f} bits)",
        ppl[sp],
        ppl[small],
    )
    res.claim(
        f"SpQR near-lossless: ppl / float ppl < {ex.near_lossless}",
        ppl[sp] / ppl["float"],
        ex.near_lossless,
    )
    if 2 in ex.rtn_bits:
        res.claim("VPTQ perplexity < RTN-W2", ppl["vptq"], ppl["rtn2"])
        res.claim(
            "VPTQ bits <= RTN-W2 bits", res.metrics["vptq.bits"], res.metrics["rtn2.bits"], "<="
        )
    res.figures.append(_plot(res.metrics, out_dir))
    return res


def _plot(m: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({k.rsplit(".", 1)[0] for k in m if k.endswith(".ppl")} - {"float"})
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for n in names:
        ax.scatter(m[f"{n}.bits"], m[f"{n}.ppl"], marker="s" if "eora" in n else "o")
        ax.annotate(n, (m[f"{n}.bits"], m[f"{n}.ppl"]), fontsize=7)
    ax.axhline(m["float.ppl"], color="k", lw=1, ls="--", label="float")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per quantized weight")
    ax.set_ylabel("validation perplexity")
    ax.legend()
    fig.tight_layout()
    path = Path(out_dir) / "quant_ppl.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
