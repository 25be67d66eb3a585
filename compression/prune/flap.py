"""FLAP: fluctuation-based adaptive structured pruning of attention heads and MLP channels.

For the input channels j of a layer's output projection (attention: o_proj, whose input holds
the heads' outputs side by side; MLP: down_proj, whose input is the SwiGLU hidden layer), with
calibration inputs x_{n,j} and the Flax kernel W (d_in, d_out):

    fluctuation (WIFV):  S_j = Var_n(x_{n,j}) · ‖W_{j,:}‖²₂

— a channel whose input hardly fluctuates around its mean is recoverable by a constant. Scores
are standardised per layer, (S − mean S) / std S (attention: S², as the reference code does,
then averaged over the channels of each head), so that heads and channels of every layer share
one scale; the adaptive structure ("AL-AM") then removes, over all layers at once, the
lowest-scoring units until the removed parameter count reaches the target ratio (a key/value
group of g query heads costs (2g + 2)·d_model·d_head parameters, an MLP channel 3·d_model: the
reference's weight 4·128/3 for d_head = 128, g = 1).
"UL-UM" removes the same fraction of heads and channels in every layer instead, by raw score.

Bias compensation replaces each removed channel by its calibration mean (the baseline):

    b = Σ_{j removed} x̄_j W_{j,:},

added to o_proj / down_proj as a bias, so the pruned layer's output is exact on average over the
calibration set. `flap_prune` really shrinks the arrays (q/k/v columns and o_proj rows of
removed heads; gate/up columns and down_proj rows of removed channels), so the result is a
smaller `TransformerLM` (it reads head counts, MLP widths and biases from the parameters); with
``shrink=False`` it zeroes the same weights at full shape instead (the masked model).
Statistics are taken once from the dense model (FLAP's reference computes each layer's on the
dense model's own activations too).

Layout: the parameters of `feynkit.models.transformer.TransformerLM`, ``layers_{i}/self_attn/
{q,k,v,o}_proj`` and ``layers_{i}/mlp/{gate,up,down}_proj``; grouped-query models prune whole
key/value groups (a key/value head with the query heads that read it). Every layer keeps at
least one group and one channel. A head-pruned model serves full-sequence ``forward``; its
uniform `KVCache` no longer fits when layers keep different numbers of heads.

References:
  An et al. (2024), "Fluctuation-based Adaptive Structured Pruning for Large Language Models"
  (Eq. 4-8; reference code: WIFV metric, standardisation, AL-AM with head weight 4·128/3).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from feynkit.compression.quant.calibration import collect_inputs
from feynkit.core.types import Array, PyTree

__all__ = [
    "FLAP_STRUCTURES",
    "FlapPlan",
    "FlapStatistics",
    "flap",
    "flap_plan",
    "flap_prune",
    "flap_scores",
    "flap_statistics",
    "fluctuation_scores",
]

FLAP_STRUCTURES = ("AL-AM", "UL-UM")
_ATTN, _MLP = "self_attn/o_proj/kernel", "mlp/down_proj/kernel"


class FlapStatistics(NamedTuple):
    """Per output-projection kernel path: mean and variance of each input channel.

    Attributes:
      mean: path → (d_in,) float32 x̄_j (the baseline of bias compensation).
      var: path → (d_in,) float32 sample variance of x_{·,j} (ddof 1).
      num_rows: rows (tokens) the statistics were taken over.
    """

    mean: dict[str, Array]
    var: dict[str, Array]
    num_rows: int


class FlapPlan(NamedTuple):
    """What to keep: per layer name, a bool mask over key/value groups and one over channels.

    Attributes:
      heads: layer → (num_kv_heads,) True = keep the group.
      channels: layer → (mlp_dim,) True = keep the channel.
      removed_fraction: removed / total attention + MLP kernel parameters.
    """

    heads: dict[str, np.ndarray]
    channels: dict[str, np.ndarray]
    removed_fraction: float


def _layers(params: PyTree) -> list[str]:
    names = sorted(
        (k for k in params if re.fullmatch(r"layers_\d+", str(k))), key=lambda k: int(k[7:])
    )
    if not names or any("self_attn" not in params[n] or "mlp" not in params[n] for n in names):
        raise ValueError(
            "params must be TransformerLM parameters with layers_{i}/self_attn and layers_{i}/mlp."
        )
    return names


def flap_statistics(
    apply_fn: Callable, params: PyTree, inputs, *, batch_size: int | None = 8
) -> FlapStatistics:
    """Mean and variance of the inputs of every o_proj and down_proj kernel, from the model's
    own forward pass (``apply_fn(params, *batch)``, e.g. ``model.forward``) on calibration
    samples (e.g. (n, T) token windows), via `calibration.collect_inputs`."""
    rows = collect_inputs(
        apply_fn, params, inputs, [r".*" + _ATTN, r".*" + _MLP], batch_size=batch_size
    )
    mean = {p: jnp.mean(x, axis=0) for p, x in rows.items()}
    var = {p: jnp.var(x, axis=0, ddof=1) for p, x in rows.items()}
    return FlapStatistics(mean, var, int(next(iter(rows.values())).shape[0]))


def fluctuation_scores(kernel, var) -> Array:
    """S_j = Var(x_j) · ‖W_{j,:}‖² for a Flax kernel W (d_in, d_out) (FLAP's WIFV)."""
    kernel = jnp.asarray(kernel, jnp.float32)
    return jnp.asarray(var, jnp.float32) * jnp.sum(kernel * kernel, axis=1)


def _standardise(s: np.ndarray) -> np.ndarray:
    sd = s.std(ddof=1)
    return (s - s.mean()) / (sd if sd > 0 else 1.0)


def _geometry(layer: Mapping, head_dim: int) -> tuple[int, int, int]:
    """(query heads, key/value groups, MLP width) of one layer, from its kernel shapes."""
    h = layer["self_attn"]["q_proj"]["kernel"].shape[1] // head_dim
    kv = layer["self_attn"]["k_proj"]["kernel"].shape[1] // head_dim
    if h < 1 or kv < 1 or h % kv:
        raise ValueError(f"head_dim={head_dim} does not split the q/k kernels into heads.")
    return h, kv, layer["mlp"]["gate_proj"]["kernel"].shape[1]


def flap_scores(
    params: PyTree, stats: FlapStatistics, head_dim: int, *, standardise: bool = True
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per layer: (key/value group scores, channel scores), standardised per layer (AL-AM) or
    raw (``standardise=False``, UL-UM ranks within a layer)."""
    heads, channels = {}, {}
    for name in _layers(params):
        layer = params[name]
        h, kv, _ = _geometry(layer, head_dim)
        a_path, m_path = f"{name}/{_ATTN}", f"{name}/{_MLP}"
        if a_path not in stats.var or m_path not in stats.var:
            raise ValueError(f"stats lack {name}'s o_proj/down_proj inputs; rerun flap_statistics.")
        sa = np.asarray(
            fluctuation_scores(layer["self_attn"]["o_proj"]["kernel"], stats.var[a_path]),
            np.float64,
        )
        sm = np.asarray(
            fluctuation_scores(layer["mlp"]["down_proj"]["kernel"], stats.var[m_path]), np.float64
        )
        if not (np.all(np.isfinite(sa)) and np.all(np.isfinite(sm))):
            raise ValueError(f"FLAP scores of {name} are not finite (NaN/inf statistics).")
        if standardise:
            sa, sm = _standardise(sa**2), _standardise(sm)
        heads[name] = sa.reshape(kv, (h // kv) * head_dim).mean(axis=1)
        channels[name] = sm
    return heads, channels


def _unit_costs(layer: Mapping, head_dim: int) -> tuple[int, int, int]:
    """(parameters per key/value group, per MLP channel, total attention + MLP parameters)."""
    h, kv, m = _geometry(layer, head_dim)
    d = layer["self_attn"]["q_proj"]["kernel"].shape[0]
    g = h // kv
    group = (2 * g + 2) * d * head_dim
    return group, 3 * d, kv * group + m * 3 * d


def flap_plan(
    params: PyTree,
    stats: FlapStatistics,
    ratio: float,
    head_dim: int,
    structure: str = "AL-AM",
) -> FlapPlan:
    """Which key/value groups and MLP channels to keep at a target parameter `ratio` removed.

    Args:
      params: TransformerLM parameters; stats: from `flap_statistics`.
      ratio: fraction in [0, 1) of attention + MLP kernel parameters to remove.
      head_dim: the model's head width (``model.head_dim``).
      structure: "AL-AM" (adaptive across layers and modules: one global threshold on the
        standardised scores, weighted by each unit's parameter count) or "UL-UM" (uniform:
        the same fraction of groups and of channels in every layer).

    Raises:
      ValueError: ratio outside [0, 1), an unknown structure, or statistics that do not match.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ValueError(f"ratio={ratio!r} must be a number in [0, 1) (the fraction removed).")
    if structure not in FLAP_STRUCTURES:
        raise ValueError(f"structure must be one of {FLAP_STRUCTURES}, got {structure!r}.")
    names = _layers(params)
    heads, channels = flap_scores(params, stats, head_dim, standardise=structure == "AL-AM")
    costs = {n: _unit_costs(params[n], head_dim) for n in names}
    total = sum(c[2] for c in costs.values())
    keep_h, keep_c = {}, {}
    if structure == "UL-UM":
        for n in names:
            keep_h[n] = _keep_top(heads[n], len(heads[n]) - round(ratio * len(heads[n])))
            keep_c[n] = _keep_top(channels[n], len(channels[n]) - round(ratio * len(channels[n])))
    else:
        scores = np.concatenate([heads[n] for n in names] + [channels[n] for n in names])
        weights = np.concatenate(
            [np.full(len(heads[n]), costs[n][0] / costs[n][1], np.float64) for n in names]
            + [np.ones(len(channels[n])) for n in names]
        )
        order = np.argsort(-scores, kind="stable")
        kept_weight = np.cumsum(weights[order])
        target = (1.0 - ratio) * weights.sum()
        cut = int(np.argmin(np.abs(kept_weight - target)))
        keep = np.zeros(len(scores), bool)
        keep[order[: cut + 1]] = True
        if ratio == 0:
            keep[:] = True
        i = 0
        for n in names:
            keep_h[n] = keep[i : i + len(heads[n])]
            i += len(heads[n])
        for n in names:
            keep_c[n] = keep[i : i + len(channels[n])]
            i += len(channels[n])
    for n in names:  # never remove a whole module
        if not keep_h[n].any():
            keep_h[n] = _keep_top(heads[n], 1)
        if not keep_c[n].any():
            keep_c[n] = _keep_top(channels[n], 1)
    removed = sum(
        costs[n][0] * int((~keep_h[n]).sum()) + costs[n][1] * int((~keep_c[n]).sum()) for n in names
    )
    return FlapPlan(keep_h, keep_c, removed / total)


def _keep_top(scores: np.ndarray, k: int) -> np.ndarray:
    keep = np.zeros(len(scores), bool)
    keep[np.argsort(-scores, kind="stable")[: max(int(k), 0)]] = True
    return keep


def _compensate(proj: dict, keep: np.ndarray, mean: Array, bias: bool) -> dict:
    """An output projection without its removed input rows (or with them zeroed), plus the
    bias Σ_{removed} x̄_j W_{j,:} when `bias`."""
    out = dict(proj)
    kernel = jnp.asarray(proj["kernel"])
    if bias:
        removed = jnp.asarray(~keep, kernel.dtype)
        extra = jnp.matmul(
            (jnp.asarray(mean, jnp.float32) * removed),
            kernel.astype(jnp.float32),
            precision="highest",
        ).astype(kernel.dtype)
        out["bias"] = jnp.asarray(proj.get("bias", 0.0), kernel.dtype) + extra
    return out


def flap_prune(
    params: PyTree,
    stats: FlapStatistics,
    plan: FlapPlan,
    head_dim: int,
    *,
    bias_compensation: bool = True,
    shrink: bool = True,
) -> PyTree:
    """Apply a `FlapPlan`: the smaller TransformerLM parameters (``shrink=True``) or the same
    weights zeroed at full shape (``shrink=False``), with FLAP's compensation biases on o_proj
    and down_proj when `bias_compensation`.

    Args:
      params, stats: as for `flap_plan`; plan: its result; head_dim: ``model.head_dim``.
      bias_compensation: add b = Σ_{removed j} x̄_j W_{j,:} to the output projections.
      shrink: slice the arrays (a smaller model) rather than zero them.

    Returns:
      The pruned parameters (other leaves shared with `params`).
    """
    out = dict(params)
    for name in _layers(params):
        layer = params[name]
        h, kv, m = _geometry(layer, head_dim)
        g = h // kv
        keep_g = np.asarray(plan.heads[name], bool)
        keep_c = np.asarray(plan.channels[name], bool)
        if keep_g.shape != (kv,) or keep_c.shape != (m,):
            raise ValueError(
                f"plan does not match {name}: {keep_g.shape} vs ({kv},), {keep_c.shape} vs ({m},)."
            )
        q_cols = np.repeat(keep_g, g * head_dim)  # query heads of a group are contiguous
        kv_cols = np.repeat(keep_g, head_dim)
        attn, mlp = dict(layer["self_attn"]), dict(layer["mlp"])
        o = _compensate(attn["o_proj"], q_cols, stats.mean[f"{name}/{_ATTN}"], bias_compensation)
        d = _compensate(mlp["down_proj"], keep_c, stats.mean[f"{name}/{_MLP}"], bias_compensation)

        def cols(p, keep):
            k = jnp.asarray(p["kernel"])
            return {**p, "kernel": k[:, keep] if shrink else jnp.where(keep[None], k, 0)}

        def rows(p, keep):
            k = jnp.asarray(p["kernel"])
            return {**p, "kernel": k[keep] if shrink else jnp.where(keep[:, None], k, 0)}

        attn.update(
            q_proj=cols(attn["q_proj"], q_cols),
            k_proj=cols(attn["k_proj"], kv_cols),
            v_proj=cols(attn["v_proj"], kv_cols),
            o_proj=rows(o, q_cols),
        )
        mlp.update(
            gate_proj=cols(mlp["gate_proj"], keep_c),
            up_proj=cols(mlp["up_proj"], keep_c),
            down_proj=rows(d, keep_c),
        )
        out[name] = {**layer, "self_attn": attn, "mlp": mlp}
    return out


def flap(
    apply_fn: Callable,
    params: PyTree,
    inputs,
    ratio: float,
    head_dim: int,
    *,
    structure: str = "AL-AM",
    bias_compensation: bool = True,
    shrink: bool = True,
) -> tuple[PyTree, FlapPlan]:
    """Statistics, plan and pruning in one call: (pruned params, plan). See `flap_plan` and
    `flap_prune` for the arguments."""
    stats = flap_statistics(apply_fn, params, inputs)
    plan = flap_plan(params, stats, ratio, head_dim, structure)
    pruned = flap_prune(
        params, stats, plan, head_dim, bias_compensation=bias_compensation, shrink=shrink
    )
    return pruned, plan
