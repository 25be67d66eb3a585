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
whole model with every Dense call replaced by its W4A4 version (a Flax method interceptor).

References: Li, Lin et al. (2025) SVDQuant; Xiao et al. (2023) SmoothQuant.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from feynkit.compression.quant.calibration import collect_linear_inputs
from feynkit.compression.quant.smoothquant import (
    activation_absmax,
    smoothquant_apply,
    smoothquant_linear,
)
from feynkit.compression.quant.svdquant import svdquant_apply, svdquant_linear
from feynkit.compression.quant.tree import LINEAR_KERNELS, match_paths
from feynkit.experiments import train as tr
from feynkit.experiments.evaluation import (
    consecutive_windows,
    group_for,
    mean_token_nll,
    scoring_windows,
)
from feynkit.experiments.replications import register
from feynkit.experiments.results import Results
from feynkit.experiments.zoo import load_lm


@dataclasses.dataclass
class SVDQuantW4A4Config:
    name: str = "svdquant_w4a4"
    cache_dir: str | None = None
    lm_smoke: bool = False
    num_outliers: int = 4  # outlier channels per kernel input
    outlier_scale: float = 30.0
    calib_windows: int = 32
    heldout_windows: int = 16
    calib_len: int = 128
    eval_tokens: int = 16384
    bits: int = 4
    group_size: int = 64
    alpha: float = 0.5
    rank: int = 32
    max_error_ratio: float = 0.5  # claim: SVDQuant error < this × min(plain, SmoothQuant)


SMOKE = dict(
    lm_smoke=True, calib_windows=8, heldout_windows=4, calib_len=32, eval_tokens=2048,
    group_size=16, rank=8, max_error_ratio=1.0,
)  # fmt: skip


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


def replaced_forward(model, apply_fn):
    """jitted (layers, params, tokens) ↦ logits with each selected Dense computed by apply_fn."""

    @jax.jit
    def forward(layers, params, tokens):
        def interceptor(next_fun, args, kwargs, context):
            path = "/".join(context.module.path) + "/kernel"
            if context.method_name == "__call__" and path in layers:
                return apply_fn(layers[path], args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return model.forward(params, tokens)

    return forward


def _nll(logits, w) -> float:
    return float(mean_token_nll(logits, w[:, 1:]))


@register("svdquant_w4a4", SVDQuantW4A4Config)
def run(cfg, out_dir: Path) -> Results:
    ex = tr.experiment_config(cfg, SVDQuantW4A4Config, SMOKE)
    res = Results("svdquant_w4a4", cfg.seed)
    model, params0, corpus, lm_ex = load_lm(ex)
    params = inject_outliers(params0, cfg.seed, ex.num_outliers, ex.outlier_scale)
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

    n_win = ex.eval_tokens // lm_ex.seq_len
    w_eval = jnp.asarray(scoring_windows(corpus.validation, lm_ex.seq_len, n_win))
    ppl = {
        "float": math.exp(_nll(model.forward(params0, w_eval[:, :-1]), w_eval)),
        "float_injected": math.exp(_nll(model.forward(params, w_eval[:, :-1]), w_eval)),
    }
    for k, v in ppl.items():
        res.metric(f"{k}.ppl", v)

    def build(method, p):
        w = jnp.asarray(flat[p], jnp.float32)
        g = group_for(w.shape[0], ex.group_size)
        kw = dict(w_bits=ex.bits, a_bits=ex.bits, w_group_size=g, a_group_size=g, alpha=ex.alpha)
        if method == "plain":
            return smoothquant_linear(w, None, **kw)
        if method == "smoothquant":
            return smoothquant_linear(w, absmax[p], **kw)
        return svdquant_linear(
            w, absmax[p], ex.rank, ex.bits, g, ex.alpha, a_bits=ex.bits, a_group_size=g
        )

    errors = {}
    for method in ("plain", "smoothquant", "svdquant"):
        apply_fn = svdquant_apply if method == "svdquant" else smoothquant_apply
        layers = {p: build(method, p) for p in paths}
        errs = []
        for p in paths:
            y = xt[p] @ jnp.asarray(flat[p], jnp.float32)
            e = apply_fn(layers[p], xt[p]) - y
            errs.append(float(jnp.sum(e * e) / jnp.sum(y * y)))
            res.metric(f"{method}.layer_error.{p}", errs[-1])
        errors[method] = res.metric(f"{method}.layer_error", float(np.mean(errs)))
        logits = replaced_forward(model, apply_fn)(layers, params, w_eval[:, :-1])
        ppl[method] = res.metric(f"{method}.ppl", math.exp(_nll(logits, w_eval)))
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
    res.figures.append(_plot(errors, ppl, out_dir))
    return res


def _plot(errors, ppl, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(errors)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    axes[0].bar(names, [errors[n] for n in names])
    axes[0].set_yscale("log")
    axes[0].set_ylabel("held-out relative layer error")
    axes[1].bar(names, [ppl[n] for n in names])
    axes[1].axhline(ppl["float"], color="k", ls="--", lw=1, label="float")
    axes[1].set_ylabel("validation perplexity")
    axes[1].legend()
    fig.suptitle("W4A4 with injected activation outliers")
    fig.tight_layout()
    path = Path(out_dir) / "svdquant_w4a4.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
