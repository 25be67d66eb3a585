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
ones). Every method is a `feynkit.compression.quant` recipe; its compressed tree is evaluated
through `dequantize_tree`. Bits (``<method>.bits``, the papers' convention, which the claims
use): RTN/GPTQ b + (16 + b)/g (fp16 scale, b-bit zero per group, the GPTQ convention); SpQR
and VPTQ their protocol storage (`bits_per_weight`: SpQR's 3-bit codes, 3-bit and fp16
statistics, fp16 outliers with indices; VPTQ's indices and fp16 codebook); EoRA adds its fp16
factors, 16·r·(d_in + d_out) bits per kernel. ``<method>.storage_bits`` is what feynkit's
containers store (`tree_bits_per_weight`), which differs from the convention for RTN/GPTQ
only: `QuantizedArray` keeps float32 scales and zero points. Float weights are counted as
16 bits (bf16).

References: Frantar et al. (2023) GPTQ; Dettmers et al. (2024) SpQR; Liu et al. (2024) VPTQ;
Liu et al. (2024) EoRA.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from omegaconf import MISSING

from feynkit.compression.layerwise import compress_layerwise
from feynkit.compression.protocol import array_bits
from feynkit.compression.quant import (
    LINEAR_KERNELS,
    LowRankCompensated,
    QuantizedArray,
    dequantize_tree,
    gptq_recipe,
    map_matching,
    match_paths,
    rtn_recipe,
    spqr_recipe,
    tree_bits_per_weight,
    vptq_recipe,
)
from feynkit.compression.quant.calibration import calibrate, linear_hessians
from feynkit.compression.quant.eora import eora_compensation, svd_compensation
from feynkit.experiments import harness
from feynkit.experiments.evaluation import consecutive_windows, lm_nll_fn
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class QuantPPLConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/quant_ppl.yaml` (the values live there)."""

    cache_dir: str | None = MISSING  # model cache of the trained LM
    lm_smoke: bool = MISSING  # use train_lm's smoke model
    calib_windows: int = MISSING
    calib_len: int = MISSING
    heldout_windows: int = MISSING
    eval_tokens: int = MISSING
    group_size: int = MISSING  # RTN/GPTQ target group (largest divisor of d_in ≤ this)
    rtn_bits: list[int] = MISSING
    gptq_bits: list[int] = MISSING
    spqr_bits: int = MISSING
    spqr_group_size: int = MISSING
    spqr_outlier_threshold: float = MISSING
    gptq_small_group: int = MISSING  # GPTQ at SpQR's bits and group: the equal-bits comparison
    vptq_vector_len: int = MISSING
    vptq_centroids: int = MISSING
    vptq_res_centroids: int = MISSING
    kmeans_iters: int = MISSING
    eora_rank: int = MISSING
    eora_methods: list[str] = MISSING
    near_lossless: float = MISSING  # claim: SpQR ppl / float ppl below this
    # Curves at equal total bits, all calibrated layer by layer on the quantized prefix:
    curve_spqr_bits: list[int] = MISSING  # SpQR base bits (groups spqr_group_size, 3-bit stats)
    curve_taus: list[float] = MISSING  # outlier thresholds τ (inf: no outliers)
    curve_gptq_bits: list[int] = MISSING  # GPTQ (act order) bits
    curve_gptq_groups: list[int] = MISSING  # GPTQ groups (0: per output channel)
    curve_percdamp: float = MISSING  # SpQR's recipe: 1.0 (relative damping of diag H)
    near_lossless_bits: float = MISSING  # the SpQR point nearest this is the near-lossless one

    def __post_init__(self):
        for key in ("calib_windows", "calib_len", "heldout_windows", "eval_tokens", "eora_rank"):
            harness.require(getattr(self, key) >= 1, key, "must be >= 1.")
        for key in ("rtn_bits", "gptq_bits"):
            for b in getattr(self, key):
                harness.require(2 <= b <= 8, key, f"entries must lie in 2..8, got {b}.")
        harness.require(
            2 <= self.spqr_bits <= 8, "spqr_bits", f"must lie in 2..8, got {self.spqr_bits}."
        )
        known = (
            [f"rtn{b}" for b in self.rtn_bits]
            + [f"gptq{b}" for b in self.gptq_bits]
            + [f"gptq{self.spqr_bits}_g{self.gptq_small_group}", f"spqr{self.spqr_bits}", "vptq"]
        )
        for m in self.eora_methods:
            harness.require(
                m in known, "eora_methods", f"has {m!r}, not a method; choose from {known}."
            )


_eora = jax.jit(eora_compensation, static_argnames="rank")
_svd = jax.jit(svd_compensation, static_argnames="rank")


def rel_layer_error(w, wh, H) -> float:
    """tr(ΔWᵀ H ΔW) / tr(Wᵀ H W): the relative output error on the inputs behind H."""
    w, d = np.asarray(w, np.float64), np.asarray(w, np.float64) - np.asarray(wh, np.float64)
    H = np.asarray(H, np.float64)
    return float(np.sum(d * (H @ d)) / np.sum(w * (H @ w)))


def convention_bits(leaf) -> float:
    """Bits per weight of one compressed kernel as the papers count them (module docstring)."""
    if isinstance(leaf, QuantizedArray):  # GPTQ convention: fp16 scale, b-bit zero per group
        return leaf.bits + (16 + leaf.bits) / leaf.group_size
    if isinstance(leaf, LowRankCompensated):
        return convention_bits(leaf.base) + array_bits(leaf.a, leaf.b) / leaf.size
    return leaf.bits_per_weight


def _recipes(ex: QuantPPLConfig, seed: int) -> dict:
    """name → recipe on the attention and MLP kernels."""
    kw = dict(group_rule="divisor", symmetric=False, where=LINEAR_KERNELS)
    out = {f"rtn{b}": rtn_recipe(b, group_size=ex.group_size, **kw) for b in ex.rtn_bits}
    out.update({f"gptq{b}": gptq_recipe(b, group_size=ex.group_size, **kw) for b in ex.gptq_bits})
    small = f"gptq{ex.spqr_bits}_g{ex.gptq_small_group}"
    out[small] = gptq_recipe(ex.spqr_bits, group_size=ex.gptq_small_group, **kw)
    out[f"spqr{ex.spqr_bits}"] = spqr_recipe(
        ex.spqr_bits,
        group_size=ex.spqr_group_size,
        outlier_threshold=ex.spqr_outlier_threshold,
        where=LINEAR_KERNELS,
    )
    out["vptq"] = vptq_recipe(
        vector_len=ex.vptq_vector_len,
        num_centroids=ex.vptq_centroids,
        num_res_centroids=ex.vptq_res_centroids,
        kmeans_iters=ex.kmeans_iters,
        seed=seed,
        where=LINEAR_KERNELS,
    )
    return out


def _curve_recipes(ex: QuantPPLConfig) -> dict:
    """name → recipe of the bits-vs-perplexity curves (act order, ``curve_percdamp``)."""
    out = {}
    for b in ex.curve_gptq_bits:
        for g in ex.curve_gptq_groups:
            out[f"seq.gptq{b}_g{g or 'ch'}"] = gptq_recipe(
                b,
                group_size=g or None,
                group_rule="divisor",
                symmetric=False,
                percdamp=ex.curve_percdamp,
                act_order=True,
                where=LINEAR_KERNELS,
            )
    for b in ex.curve_spqr_bits:
        for tau in ex.curve_taus:
            out[f"seq.spqr{b}_t{tau:g}"] = spqr_recipe(
                b,
                group_size=ex.spqr_group_size,
                outlier_threshold=tau,  # inf: no weight is an outlier
                percdamp=ex.curve_percdamp,
                act_order=True,
                where=LINEAR_KERNELS,
            )
    return out


def interp_curve(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation of (bits, ppl) at ``x`` on the lower envelope (the best
    perplexity reachable at ≤ bits); NaN outside the bits range of ``points``."""
    pts = sorted(points)
    xs, ys = np.array([p[0] for p in pts]), np.minimum.accumulate([p[1] for p in pts])
    if not xs[0] <= x <= xs[-1]:
        return float("nan")
    return float(np.interp(x, xs, ys))


def _low_rank(compensation, qtree, kernels, H, rank: int):
    """`qtree` with each kernel's error compensated by a rank-r fp16 correction (EoRA's
    `eora_recipe` container, built on the already quantized kernels)."""

    def one(path, leaf):
        delta = kernels[path] - leaf.dequantize()
        comp = (
            compensation(delta, H[path], rank=rank)
            if H is not None
            else compensation(delta, rank=rank)
        )
        return LowRankCompensated(leaf, comp.a.astype(jnp.float16), comp.b.astype(jnp.float16))

    return map_matching(one, qtree, LINEAR_KERNELS)


@harness.replication("quant_ppl", QuantPPLConfig)
def run(ex: QuantPPLConfig, ctx: harness.Context) -> None:
    res = ctx
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

    def layer_error(deq) -> float:
        flat_deq = traverse_util.flatten_dict(deq, sep="/")
        return float(np.mean([rel_layer_error(kernels[p], flat_deq[p], H_test[p]) for p in paths]))

    def record(name, qtree, seconds):
        deq = dequantize_tree(qtree)
        ppl[name] = res.metric(f"{name}.ppl", math.exp(nll(deq)))
        leaves = traverse_util.flatten_dict(qtree, sep="/")
        bits = sum(convention_bits(leaves[p]) * kernels[p].size for p in paths) / n_weights
        res.metric(f"{name}.bits", bits)
        res.metric(f"{name}.storage_bits", tree_bits_per_weight(qtree))
        err = res.metric(f"{name}.layer_error", layer_error(deq))
        res.metric(f"{name}.seconds", seconds)
        print(
            f"{name:>12}: ppl {ppl[name]:.4f}  bits {bits:.3f}  layer err {err:.2e}  "
            f"({seconds:.1f} s)",
            flush=True,
        )

    t0 = time.perf_counter()
    methods = {name: recipe(params, H) for name, recipe in _recipes(ex, ctx.seed).items()}
    res.metric("quantize_seconds", time.perf_counter() - t0)
    for name, qtree in methods.items():
        record(name, qtree, 0.0)
    r = ex.eora_rank
    for name in ex.eora_methods:
        t0 = time.perf_counter()
        fixed = _low_rank(_eora, methods[name], kernels, H, r)
        record(f"{name}+eora", fixed, time.perf_counter() - t0)
        svd = dequantize_tree(_low_rank(_svd, methods[name], kernels, None, r))
        res.metric(f"{name}+svd.layer_error", layer_error(svd))
        res.claim(f"EoRA lowers {name} perplexity", ppl[f"{name}+eora"], ppl[name])
        res.claim(
            f"EoRA {name} held-out layer error < SVD compensation's (rank {r})",
            ctx.results.metrics[f"{name}+eora.layer_error"],
            ctx.results.metrics[f"{name}+svd.layer_error"],
        )
    for b in ex.gptq_bits:
        if b in ex.rtn_bits and b in (3, 4):
            res.claim(f"GPTQ-W{b} perplexity < RTN-W{b}", ppl[f"gptq{b}"], ppl[f"rtn{b}"])
    # SpQR against GPTQ: at equal bits, along the curves of `_curves` (the one-shot
    # spqr{bits} point above is recorded, not compared at unequal bits).
    if 2 in ex.rtn_bits:
        res.claim("VPTQ perplexity < RTN-W2", ppl["vptq"], ppl["rtn2"])
        res.claim(
            "VPTQ bits <= RTN-W2 bits",
            ctx.results.metrics["vptq.bits"],
            ctx.results.metrics["rtn2.bits"],
            "<=",
        )
    _curves(ex, ctx, model, params, calib, record, ppl)
    with ctx.figure("quant_ppl.png", figsize=(6.5, 4.5)) as (fig, axes):
        _draw(ctx.results.metrics, axes[0, 0])


def _curves(ex, ctx, model, params, calib, record, ppl) -> None:
    """SpQR and GPTQ curves, each point quantized layer by layer with `compress_layerwise`;
    one one-shot (float-Hessian) point per method family measures what sequential calibration
    changes."""
    m = ctx.results.metrics
    n_layers = len([k for k in params if k.startswith("layers_")])
    layers = [rf"layers_{i}/.*" for i in range(n_layers)]
    recipes = _curve_recipes(ex)
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        q, _ = compress_layerwise(recipe, model.forward, params, calib, layers)
        record(name, q, time.perf_counter() - t0)
    first_spqr = next(n for n in recipes if "spqr" in n)
    t0 = time.perf_counter()
    one = recipes[first_spqr](params, calibrate(model.forward, params, calib, LINEAR_KERNELS))
    record(first_spqr.replace("seq.", "oneshot."), one, time.perf_counter() - t0)
    gptq = [(m[f"{n}.bits"], ppl[n]) for n in recipes if "gptq" in n]
    spqr = [n for n in recipes if "spqr" in n]
    for n in spqr:
        ref = interp_curve(gptq, m[f"{n}.bits"])
        if math.isfinite(ref):  # inside the GPTQ curve's bits range
            ctx.metric(f"{n}.gptq_interp_ppl", ref)
    inside = [n for n in spqr if f"{n}.gptq_interp_ppl" in m]
    if inside:
        wins = sum(ppl[n] <= m[f"{n}.gptq_interp_ppl"] for n in inside)
        ctx.claim(
            f"SpQR curve below GPTQ's: fraction of SpQR points (within GPTQ's bits range, "
            f"{len(inside)}) with ppl <= interpolated GPTQ ppl at equal bits",
            wins / len(inside),
            1.0,
            ">=",
        )
    near = min(spqr, key=lambda n: abs(m[f"{n}.bits"] - ex.near_lossless_bits))
    ctx.claim(
        f"SpQR near-lossless at ~{ex.near_lossless_bits} bits ({near}, {m[f'{near}.bits']:.2f} "
        f"bits): ppl / float ppl < {ex.near_lossless}",
        ppl[near] / ppl["float"],
        ex.near_lossless,
    )
    if near in inside:
        ctx.claim(
            f"{near} ppl <= GPTQ curve at equal bits (interpolated)",
            ppl[near],
            m[f"{near}.gptq_interp_ppl"],
            "<=",
        )


def _draw(m: dict, ax) -> None:
    names = sorted({k.rsplit(".", 1)[0] for k in m if k.endswith(".ppl")} - {"float"})
    for n in names:
        ax.scatter(m[f"{n}.bits"], m[f"{n}.ppl"], marker="s" if "eora" in n else "o")
        ax.annotate(n, (m[f"{n}.bits"], m[f"{n}.ppl"]), fontsize=7)
    ax.axhline(m["float.ppl"], color="k", lw=1, ls="--", label="float")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per quantized weight")
    ax.set_ylabel("validation perplexity")
    ax.legend()
