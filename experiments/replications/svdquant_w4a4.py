"""Replication: W4A4 of the trained LM with injected activation outliers — SVDQuant vs smoothing.

The small byte-level LM has no activation outliers to speak of, so we give it some, keeping the
float model unchanged. For ``num_outliers`` channels c of each kernel input (seeded choice),
scaled by a factor f (``outlier_scale``, 30 by default; LLMs show 10–100×):

* q/k/v and gate/up read RMSNorm outputs: the norm scale γ_c ← f·γ_c, kernel rows W_c ← W_c / f;
* o_proj reads the attention output, linear in v: v_proj column c ← f·(column c), o_proj row
  c ← row c / f;
* down_proj reads silu(gate) ⊙ up, linear in up: up_proj column c ← f·(column c), down_proj
  row c ← row c / f.

Each rewrite is exact in real arithmetic (the float perplexity moves only by round-off). Every
kernel is then run W4A4 (4-bit symmetric weights in groups of 64 along the input, 4-bit
activations per token × 64 channels; the group is the largest divisor of d_in ≤ 64):

* plain RTN (no smoothing), * SmoothQuant (α = 0.5), * SVDQuant (α = 0.5, rank 32, bf16 branch).

Activation maxima come from calibration windows of the training split; the reported layer error
‖Ŷ − XW‖² / ‖XW‖² (mean over kernels) uses held-out validation windows; the perplexity runs the
whole model with every Dense call served by its W4A4 container (`compressed_apply`). The
methods are `feynkit.compression.quant` recipes (`smoothquant_recipe` with and without
smoothing, `svdquant_recipe`); ``<method>.storage_bits`` is the protocol's storage count
(`tree_bits_per_weight`: 4-bit codes, float32 scales and smoothing factors, the bf16 branch).

References: Li, Lin et al. (2025) SVDQuant; Xiao et al. (2023) SmoothQuant.
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from omegaconf import MISSING

from feynkit.compression.quant import (
    LINEAR_KERNELS,
    compressed_apply,
    match_paths,
    smoothquant_recipe,
    svdquant_recipe,
    tree_bits_per_weight,
)
from feynkit.compression.quant.calibration import Calibration, collect_linear_inputs
from feynkit.compression.quant.smoothquant import activation_absmax
from feynkit.experiments import harness
from feynkit.experiments.evaluation import consecutive_windows, mean_token_nll, scoring_windows
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class SVDQuantW4A4Config(harness.ReplicationConfig):
    """Schema of `configs/experiment/svdquant_w4a4.yaml` (the values live there)."""

    cache_dir: str | None = MISSING
    lm_smoke: bool = MISSING
    num_outliers: int = MISSING  # outlier channels per kernel input
    outlier_scale: float = MISSING
    calib_windows: int = MISSING
    heldout_windows: int = MISSING
    calib_len: int = MISSING
    eval_tokens: int = MISSING
    bits: int = MISSING
    group_size: int = MISSING
    alpha: float = MISSING
    rank: int = MISSING
    max_error_ratio: float = MISSING  # claim: SVDQuant error < this × min(plain, SmoothQuant)

    def __post_init__(self):
        for key in ("num_outliers", "calib_windows", "heldout_windows", "calib_len", "rank"):
            harness.require(getattr(self, key) >= 1, key, "must be >= 1.")
        harness.require(
            self.outlier_scale > 0, "outlier_scale", f"must be > 0, got {self.outlier_scale}."
        )
        harness.require(2 <= self.bits <= 8, "bits", f"must lie in 2..8, got {self.bits}.")
        harness.require(
            0 <= self.alpha <= 1,
            "alpha",
            f"(migration strength) must lie in [0, 1], got {self.alpha}.",
        )


def inject_outliers(params, seed: int, num: int, scale: float):
    """Function-preserving rescaling that gives every kernel input `num` channels × `scale`."""
    flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(params, sep="/").items()}
    layers = sorted({k.split("/")[0] for k in flat if re.match(r"layers_\d+/", k)})
    rng = np.random.default_rng(seed)

    def pick(width):
        return rng.choice(width, num, replace=False)

    for layer in layers:
        a, m = f"{layer}/self_attn", f"{layer}/mlp"
        for norm, block, readers in (
            ("input_layernorm", a, ("q_proj", "k_proj", "v_proj")),
            ("post_attention_layernorm", m, ("gate_proj", "up_proj")),
        ):
            c = pick(flat[f"{layer}/{norm}/scale"].shape[0])
            flat[f"{layer}/{norm}/scale"][c] *= scale
            for r in readers:
                flat[f"{block}/{r}/kernel"][c] /= scale
        for src, dst in ((f"{a}/v_proj", f"{a}/o_proj"), (f"{m}/up_proj", f"{m}/down_proj")):
            c = pick(flat[f"{dst}/kernel"].shape[0])
            flat[f"{src}/kernel"][:, c] *= scale
            flat[f"{dst}/kernel"][c] /= scale
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def _nll(logits, w) -> float:
    return float(mean_token_nll(logits, w[:, 1:]))


def _recipes(ex: SVDQuantW4A4Config) -> dict:
    """W4A4 recipes on the attention and MLP kernels (groups: largest divisor ≤ group_size)."""
    gs, kw = ex.group_size, dict(group_rule="divisor", where=LINEAR_KERNELS)
    smooth = dict(w_bits=ex.bits, a_bits=ex.bits, alpha=ex.alpha, w_group_size=gs, a_group_size=gs)
    return {
        "plain": smoothquant_recipe(**smooth, smooth=False, **kw),
        "smoothquant": smoothquant_recipe(**smooth, **kw),
        "svdquant": svdquant_recipe(
            rank=ex.rank, bits=ex.bits, group_size=gs, alpha=ex.alpha, a_bits=ex.bits,
            a_group_size=gs, **kw,
        ),
    }  # fmt: skip


@harness.replication("svdquant_w4a4", SVDQuantW4A4Config)
def run(ex: SVDQuantW4A4Config, ctx: harness.Context) -> None:
    res = ctx
    model, params0, corpus, lm_ex = load_lm(ex)
    params = inject_outliers(params0, ctx.seed, ex.num_outliers, ex.outlier_scale)
    paths = match_paths(params, LINEAR_KERNELS)
    flat = traverse_util.flatten_dict(params, sep="/")
    calib = consecutive_windows(corpus.train, ex.calib_windows, ex.calib_len)
    heldout = consecutive_windows(
        corpus.validation, ex.heldout_windows, ex.calib_len, ex.eval_tokens + 1
    )
    xs = collect_linear_inputs(model, params, calib, LINEAR_KERNELS, batch_size=8)
    xt = collect_linear_inputs(model, params, heldout, LINEAR_KERNELS, batch_size=8)
    absmax = {p: activation_absmax(xs[p]) for p in paths}
    ratio = [float(jnp.max(a) / jnp.median(a)) for a in absmax.values()]
    res.metric("activation_max_over_median", float(np.mean(ratio)))
    stats = Calibration(hessians={}, absmax=absmax, num_samples=int(calib.shape[0]))

    n_win = ex.eval_tokens // lm_ex.seq_len
    w_eval = jnp.asarray(scoring_windows(corpus.validation, lm_ex.seq_len, n_win))
    ppl = {
        "float": math.exp(_nll(model.forward(params0, w_eval[:, :-1]), w_eval)),
        "float_injected": math.exp(_nll(model.forward(params, w_eval[:, :-1]), w_eval)),
    }
    for k, v in ppl.items():
        res.metric(f"{k}.ppl", v)

    forward = jax.jit(compressed_apply(model.forward))
    errors = {}
    for method, recipe in _recipes(ex).items():
        qparams = recipe(params, stats)
        leaves = traverse_util.flatten_dict(qparams, sep="/")
        errs = []
        for p in paths:
            y = xt[p] @ jnp.asarray(flat[p], jnp.float32)
            e = leaves[p].matmul(xt[p]) - y
            errs.append(float(jnp.sum(e * e) / jnp.sum(y * y)))
            res.metric(f"{method}.layer_error.{p}", errs[-1])
        errors[method] = res.metric(f"{method}.layer_error", float(np.mean(errs)))
        logits = forward(qparams, w_eval[:, :-1])
        ppl[method] = res.metric(f"{method}.ppl", math.exp(_nll(logits, w_eval)))
        res.metric(f"{method}.storage_bits", tree_bits_per_weight(qparams))
        print(f"{method:>12}: layer err {errors[method]:.3e}  ppl {ppl[method]:.4f}", flush=True)

    res.claim(
        "float perplexity unchanged by the outlier injection (relative change < 1e-3)",
        abs(ppl["float_injected"] / ppl["float"] - 1),
        1e-3,
    )
    best = min(errors["plain"], errors["smoothquant"])
    res.claim(
        f"SVDQuant W4A4 layer error < {ex.max_error_ratio} x min(plain, SmoothQuant)",
        errors["svdquant"],
        ex.max_error_ratio * best,
    )
    res.claim(
        "SVDQuant W4A4 perplexity < min(plain, SmoothQuant)",
        ppl["svdquant"],
        min(ppl["plain"], ppl["smoothquant"]),
    )
    with ctx.figure("svdquant_w4a4.png", 1, 2, figsize=(8, 3.5)) as (fig, axes):
        _draw(errors, ppl, fig, axes[0])


def _draw(errors, ppl, fig, axes) -> None:
    names = list(errors)
    axes[0].bar(names, [errors[n] for n in names])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out relative layer error")
    axes[1].bar(names, [ppl[n] for n in names])
    axes[1].axhline(ppl["float"], color="k", ls="--", lw=1, label="float")
    axes[1].set_ylabel("validation perplexity")
    axes[1].legend()
    fig.suptitle("W4A4 with injected activation outliers")
