"""Replication: I-ViT's integer-only Shiftmax, ShiftGELU and I-LayerNorm on real LM activations.

Claim (Li & Gu 2023, "I-ViT"): softmax, GELU and LayerNorm can be computed with integer
adds, shifts and integer division only (Shiftmax, ShiftGELU, I-LayerNorm) accurately enough to
replace their float versions. Here "accurately" is made quantitative: on activations of the
trained byte-level LM, each integer op's dequantized output is compared with the float op on
the same (dequantized) input, and its error must stay below the worst-case bound derived in
`feynkit.compression.quant.integer_ops` (shift-exponential chord, floors, output codes) and
below a stated absolute level.

Inputs (validation windows of the `train_lm` corpus, every layer):
* softmax: the causal attention logits q·k/√d (RoPE applied), masked entries excluded;
* GELU/SiLU: the MLP gate pre-activations (the LM's SwiGLU uses SiLU = x σ(x), i.e. ShiftGELU
  with α = 1; α = 1.702 is compared with the exact erf GELU, which the I-ViT op replaces);
* LayerNorm: the residual stream entering each norm (the LM itself uses RMSNorm), with the
  model's norm weights as γ and β = 0.
Each is quantized per tensor to symmetric ``b``-bit codes, b in ``input_bits`` (8: I-ViT's
requantized activations; 16: a finer code such as an int32 matmul output), for LayerNorm
b in ``layernorm_input_bits`` (Σ(q − μ)² must fit int32).
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
from scipy.special import erf

from feynkit.compression.quant.integer_ops import (
    i_layernorm,
    i_layernorm_error_bound,
    shift_gelu,
    shift_gelu_error_bound,
    shiftmax,
    shiftmax_error_bound,
)
from feynkit.experiments import harness, zoo
from feynkit.models.transformer import apply_rope, rope_cos_sin

_MASKED = -(1 << 29)  # code of a masked logit: its exponential underflows to exactly 0


@dataclasses.dataclass
class IntegerOpsConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/integer_ops.yaml` (the values live there)."""

    cache_dir: str | None = MISSING  # model cache of the trained LM
    eval_windows: int = MISSING  # validation windows of train_lm's seq_len tokens
    input_bits: list[int] = MISSING
    layernorm_input_bits: list[int] = MISSING
    out_bits: int = MISSING  # Shiftmax / ShiftGELU sigmoid output bits
    # claims (absolute max errors); max_layernorm_error has one entry per layernorm_input_bits
    max_softmax_error: float = MISSING
    max_silu_error: float = MISSING
    max_gelu_error: float = MISSING
    max_layernorm_error: list[float] = MISSING

    def __post_init__(self):
        harness.require(
            self.eval_windows >= 1, "eval_windows", f"must be >= 1, got {self.eval_windows}."
        )
        harness.require(
            len(self.max_layernorm_error) == len(self.layernorm_input_bits),
            "max_layernorm_error",
            f"needs one entry per layernorm_input_bits ({len(self.layernorm_input_bits)}), "
            f"got {len(self.max_layernorm_error)}.",
        )
        harness.require(len(self.input_bits) >= 1, "input_bits", "needs at least one entry.")
        for key in ("input_bits", "layernorm_input_bits"):
            for bits in getattr(self, key):
                harness.require(2 <= bits <= 16, key, f"entries must lie in [2, 16], got {bits}.")


def _codes(x: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
    scale = float(np.abs(x).max()) / (2 ** (bits - 1) - 1)
    return np.round(x / scale).astype(np.int32), scale


def _activations(model, params, tokens) -> dict[str, list[np.ndarray]]:
    """Per layer: attention logits (masked −inf), gate pre-activations, norm inputs."""
    _, state = model.apply(
        {"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"]
    )
    acts = traverse_util.flatten_dict(state["intermediates"], sep="/")
    get = lambda name: np.asarray(acts[f"{name}/__call__"][0], np.float64)  # noqa: E731
    b, t = tokens.shape
    h, hd = model.num_heads, model.head_dim
    cos, sin = rope_cos_sin(jnp.arange(t), hd, model.rope_base)
    causal = np.tril(np.ones((t, t), bool))
    out = {"attn": [], "gate": [], "norm_in": []}
    resid = get("embed_tokens")
    for i in range(model.num_layers):
        q = apply_rope(jnp.asarray(get(f"layers_{i}/self_attn/q_proj")).reshape(b, t, h, hd),
                       cos, sin)  # fmt: skip
        k = apply_rope(
            jnp.asarray(get(f"layers_{i}/self_attn/k_proj")).reshape(b, t, h, hd), cos, sin
        )  # fmt: skip  (this LM has no grouped heads: kv = heads)
        s = np.asarray(jnp.einsum("bthd,bshd->bhts", q, k)) / math.sqrt(hd)
        out["attn"].append(np.where(causal[None, None], s, -np.inf))
        mid = resid + np.asarray(acts[f"layers_{i}/self_attn/__call__"][0][0], np.float64)
        out["norm_in"] += [resid, mid]
        out["gate"].append(get(f"layers_{i}/mlp/gate_proj"))
        resid = np.asarray(acts[f"layers_{i}/__call__"][0][0], np.float64)
    out["norm_in"].append(resid)
    return out


def _gammas(params, num_layers: int) -> list[np.ndarray]:
    g = []
    for i in range(num_layers):
        g += [np.asarray(params[f"layers_{i}"][n]["scale"], np.float64)
              for n in ("input_layernorm", "post_attention_layernorm")]  # fmt: skip
    return g + [np.asarray(params["norm"]["scale"], np.float64)]


def _softmax_errors(logits, bits, out_bits):
    errs, ratios = [], []
    op = jax.jit(shiftmax, static_argnames=("out_bits",))
    for x in logits:
        valid = np.isfinite(x)
        q, s = _codes(np.where(valid, x, 0.0), bits)
        q = np.where(valid, q, _MASKED)
        xq = np.where(valid, q * s, -np.inf)
        p, ps = op(q, s, out_bits=out_bits)
        ref = np.exp(xq - xq.max(-1, keepdims=True))
        ref /= ref.sum(-1, keepdims=True)
        err = np.abs(np.asarray(p) * float(ps) - ref)[valid]
        bound = np.broadcast_to(shiftmax_error_bound(xq, s, out_bits=out_bits), x.shape)[valid]
        errs.append(err)
        ratios.append(err / bound)
    return np.concatenate(errs), np.concatenate(ratios)


def _gelu_errors(gates, bits, out_bits, alpha):
    errs, errs_exact, ratios = [], [], []
    op = jax.jit(shift_gelu, static_argnames=("out_bits", "alpha"))
    for x in gates:
        q, s = _codes(x, bits)
        xq = q * s
        y, ys = op(q, s, out_bits=out_bits, alpha=alpha)
        y = np.asarray(y) * float(ys)
        err = np.abs(y - xq / (1 + np.exp(-alpha * xq)))
        exact = xq / (1 + np.exp(-xq)) if alpha == 1.0 else 0.5 * xq * (1 + erf(xq / math.sqrt(2)))
        errs.append(err.ravel())
        errs_exact.append(np.abs(y - exact).ravel())
        bound = shift_gelu_error_bound(xq, s, out_bits=out_bits, alpha=alpha)
        ratios.append((err / np.maximum(bound, 1e-30)).ravel())
    return np.concatenate(errs), np.concatenate(errs_exact), np.concatenate(ratios)


def _layernorm_errors(inputs, gammas, bits):
    errs, ratios = [], []
    op = jax.jit(i_layernorm)
    for x, g in zip(inputs, gammas, strict=True):
        q, s = _codes(x, bits)
        xq = q * s
        d = x.shape[-1]
        centered = q - np.round(q.mean(-1, keepdims=True))
        if (centered.astype(np.float64) ** 2).sum(-1).max() + d * 1e-5 / s**2 >= 2**31:
            raise ValueError(f"{bits}-bit LayerNorm inputs overflow int32; lower the bits.")
        y, ys = op(q, s, g, np.zeros_like(g))
        mu, var = xq.mean(-1, keepdims=True), xq.var(-1, keepdims=True)
        ref = (xq - mu) / np.sqrt(var + 1e-5) * g
        err = np.abs(np.asarray(y) * float(ys) - ref)
        errs.append(err.ravel())
        ratios.append((err / i_layernorm_error_bound(xq, s, g)).ravel())
    return np.concatenate(errs), np.concatenate(ratios)


@harness.replication("integer_ops", IntegerOpsConfig)
def run(ex: IntegerOpsConfig, ctx: harness.Context) -> None:
    res = ctx
    lm_ex = zoo.LMConfig(cache_dir=ex.cache_dir)
    if ctx.smoke:
        lm_ex = dataclasses.replace(lm_ex, **zoo.LM_SMOKE)
    corpus = zoo.lm_corpus(lm_ex)
    model, cached = zoo.trained_lm(lm_ex, ctx.seed, corpus)
    val = np.asarray(corpus.validation)
    n = min(ex.eval_windows, len(val) // lm_ex.seq_len)
    tokens = jnp.asarray(val[: n * lm_ex.seq_len].reshape(n, lm_ex.seq_len).astype(np.int32))
    t0 = time.perf_counter()
    acts = _activations(model, cached.params, tokens)
    gammas = _gammas(cached.params, model.num_layers)

    worst, plot_data = {}, {}
    for bits in ex.input_bits:
        err, ratio = _softmax_errors(acts["attn"], bits, ex.out_bits)
        _record(res, f"shiftmax.{bits}bit", err, ratio)
        worst[("softmax", bits)] = (err.max(), ratio.max())
        for name, alpha in (("silu", 1.0), ("gelu", 1.702)):
            err, err_exact, ratio = _gelu_errors(acts["gate"], bits, ex.out_bits, alpha)
            _record(res, f"shift_{name}.{bits}bit", err, ratio)
            res.metric(f"shift_{name}.{bits}bit.max_error_vs_exact", err_exact.max())
            worst[(name, bits)] = (err_exact.max(), ratio.max())
    for bits in ex.layernorm_input_bits:
        err, ratio = _layernorm_errors(acts["norm_in"], gammas, bits)
        _record(res, f"i_layernorm.{bits}bit", err, ratio)
        worst[("layernorm", bits)] = (err.max(), ratio.max())
        plot_data[bits] = err
    res.metric("seconds", time.perf_counter() - t0)

    limits = {("softmax", b): ex.max_softmax_error for b in ex.input_bits}
    limits.update({("silu", b): ex.max_silu_error for b in ex.input_bits})
    limits.update({("gelu", b): ex.max_gelu_error for b in ex.input_bits})
    limits.update(zip([("layernorm", b) for b in ex.layernorm_input_bits],
                      ex.max_layernorm_error, strict=True))  # fmt: skip
    for (op, bits), (max_err, max_ratio) in worst.items():
        vs = " vs exact GELU" if op == "gelu" else ""
        # a worst-case bound: it holds for any model and input, so smoke runs enforce it too
        res.claim(
            f"{op} ({bits}-bit inputs): max error / derived bound ≤", max_ratio, 1.0, "<=", True
        )
        res.claim(f"{op} ({bits}-bit inputs): max abs error{vs} <", max_err, limits[(op, bits)])
    with ctx.figure("integer_ops.png", 1, 2, figsize=(9, 3.6)) as (fig, axes):
        _draw(acts, ex, axes[0])


def _record(res: harness.Context, name: str, err: np.ndarray, ratio: np.ndarray) -> None:
    res.metric(f"{name}.max_error", err.max())
    res.metric(f"{name}.mean_error", err.mean())
    res.metric(f"{name}.max_error_over_bound", ratio.max())
    print(f"{name:>22}: max |err| {err.max():.4g}, mean {err.mean():.3g}, "
          f"max err/bound {ratio.max():.3f} over {err.size} values")  # fmt: skip


def _draw(acts, ex: IntegerOpsConfig, axes) -> None:
    bits = ex.input_bits[0]
    x = acts["gate"][0].ravel()[:4000]
    q, s = _codes(x, bits)
    for name, alpha in (("SiLU", 1.0), ("GELU", 1.702)):
        y, ys = shift_gelu(q, s, out_bits=ex.out_bits, alpha=alpha)
        order = np.argsort(q)
        axes[0].plot(q[order] * s, np.asarray(y)[order] * float(ys), lw=1, label=f"Shift{name}")
    axes[0].set_xlabel(f"gate pre-activation ({bits}-bit codes)")
    axes[0].set_ylabel("integer op, dequantized")
    axes[0].legend(fontsize=8)
    logits = acts["attn"][0][0, 0]  # first window, first head
    valid = np.isfinite(logits)
    q, s = _codes(np.where(valid, logits, 0.0), bits)
    p, ps = shiftmax(np.where(valid, q, _MASKED), s, out_bits=ex.out_bits)
    xq = np.where(valid, q * s, -np.inf)
    ref = np.exp(xq - xq.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    axes[1].scatter(ref[valid], (np.asarray(p) * float(ps))[valid], s=2)
    axes[1].plot([0, 1], [0, 1], "k--", lw=1)
    axes[1].set_xlabel("float softmax")
    axes[1].set_ylabel("Shiftmax, dequantized")
