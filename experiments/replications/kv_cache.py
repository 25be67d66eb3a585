"""Replication: GEAR (and EMS) KV-cache compression on the trained byte-level LM.

Claim (Kang et al. 2024, GEAR): quantizing the KV cache to ultra-low precision and correcting it
with a low-rank matrix (the quantization residual) and a sparse matrix (outliers) is
near-lossless at high compression, and better than plain uniform quantization at the same bits.
EMS (Li et al. 2024) instead keeps a per-head token budget, merging evicted tokens into kept
ones.

Protocol: consecutive validation windows of ``window_len`` + 1 bytes of the stdlib corpus (the
`train_lm` split). Each window's first ``prefix_len`` tokens are prefilled in full precision, the
cache entries are compressed once (simulated exactly: the decoder reads decompress(compress)),
and the remaining tokens are decoded teacher-forced from that cache; they stay in full precision
(a recent window, as KIVI/GEAR's buffer) unless ``recompress_every`` is set. On the decoded
positions the run reports perplexity, the next-token agreement with the full-precision cache
(argmax equal) and the compression ratio of the compressed entries against fp16 (codes, fp16
scales/zeros, fp16 low-rank factors, fp16+int32 outliers; for EMS fp16 K/V of the kept tokens
plus int32 counts and positions). Methods: plain uniform b-bit (KIVI layout: keys per channel,
values per token, asymmetric) at the same bits as GEAR, GEAR, plain uniform at b + 1 bits (a
baseline at a compression ratio close to GEAR's), and EMS at a budget giving ≥ 4×.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
from omegaconf import MISSING

from feynkit.compression.quant.kv_cache import (
    ems_kv_compressor,
    gear_kv_compressor,
    uniform_kv_compressor,
)
from feynkit.experiments import harness
from feynkit.experiments.data import BYTE_VOCAB_SIZE, load_stdlib_corpus
from feynkit.experiments.evaluation import compressed_decode_logits, mean_token_nll, scoring_windows
from feynkit.experiments.zoo import LMConfig, lm_corpus, trained_lm
from feynkit.models import TransformerLM


@dataclasses.dataclass
class KVCacheConfig(harness.ReplicationConfig):
    """Schema of `configs/experiment/kv_cache.yaml` (the values live there)."""

    random_lm: bool = MISSING  # an untrained small LM instead of the trained `train_lm` one
    num_windows: int = MISSING
    window_len: int = MISSING  # tokens per window
    prefix_len: int = MISSING  # prefilled and compressed
    recompress_every: int | None = MISSING  # GEAR streaming buffer (None: decoded tokens fp16)
    bits: int = MISSING
    gear_rank: int = MISSING
    gear_outlier_fraction: float = MISSING
    key_group_size: int | None = MISSING  # tokens per key group (None: the whole prefix)
    value_group_size: int | None = MISSING  # channels per value group (None: the head)
    ems_budget_fraction: float = MISSING
    ems_window: int = MISSING
    ems_merge_threshold: float = MISSING
    # claims
    min_compression: float = MISSING
    max_ppl_increase: float = MISSING  # ppl / full ppl − 1
    min_agreement: float = MISSING

    def __post_init__(self):
        harness.require(
            1 <= self.prefix_len < self.window_len,
            "prefix_len",
            f"must be in [1, window_len = {self.window_len}), got {self.prefix_len}.",
        )
        harness.require(self.num_windows >= 1, "num_windows", "must be >= 1.")
        harness.require(1 <= self.bits <= 8, "bits", f"must lie in [1, 8], got {self.bits}.")


def _model_and_windows(ex: KVCacheConfig, seed: int):
    if ex.random_lm:
        model = TransformerLM(BYTE_VOCAB_SIZE, 32, 1, 2, mlp_dim=64, max_len=ex.window_len)
        params = model.init_params(jax.random.key(seed))
        corpus = load_stdlib_corpus(max_bytes=300_000, fractions=(0.8, 0.1, 0.1))
    else:
        lm = LMConfig()
        corpus = lm_corpus(lm)
        model, cached = trained_lm(lm, seed, corpus)
        params = cached.params
    windows = scoring_windows(corpus.validation, ex.window_len, ex.num_windows)
    return model, params, jnp.asarray(windows)


def _evaluate(model, params, windows, compressor, ex: KVCacheConfig, full_logits):
    """Perplexity, agreement with full precision, compression ratio, seconds."""
    p, t = ex.prefix_len, ex.window_len
    fn = jax.jit(
        functools.partial(
            compressed_decode_logits,
            model,
            compressor=compressor,
            prefix_len=p,
            recompress_every=ex.recompress_every,
        )
    )
    t0 = time.perf_counter()
    logits, info = fn(params, windows[:, :t])
    logits = jax.block_until_ready(logits)
    seconds = time.perf_counter() - t0
    return _scores(logits, windows[:, p + 1 :], full_logits) + (
        float(info.fp16_bytes / info.compressed_bytes),
        seconds,
    )


def _scores(logits, targets, full_logits):
    nll = mean_token_nll(logits, targets)
    agree = (logits.argmax(-1) == full_logits.argmax(-1)).mean()
    return math.exp(float(nll)), float(agree)


@harness.replication("kv_cache", KVCacheConfig)
def run(ex: KVCacheConfig, ctx: harness.Context) -> None:
    res = ctx
    model, params, windows = _model_and_windows(ex, ctx.seed)
    res.metric("num_windows", windows.shape[0])
    res.metric("scored_tokens", windows.shape[0] * (ex.window_len - ex.prefix_len))
    full = jax.jit(model.forward)(params, windows[:, : ex.window_len])[:, ex.prefix_len :]
    ppl_full, _ = _scores(full, windows[:, ex.prefix_len + 1 :], full)
    res.metric("perplexity.fp16", ppl_full)

    groups = dict(key_group_size=ex.key_group_size, value_group_size=ex.value_group_size)
    methods = {
        f"uniform{ex.bits}": uniform_kv_compressor(ex.bits, **groups),
        "gear": gear_kv_compressor(
            ex.bits, rank=ex.gear_rank, outlier_fraction=ex.gear_outlier_fraction, **groups
        ),
        f"uniform{ex.bits + 1}": uniform_kv_compressor(ex.bits + 1, **groups),
    }
    if ex.recompress_every is None:  # EMS compresses the prefill only
        methods["ems"] = ems_kv_compressor(
            ex.ems_budget_fraction, window=ex.ems_window, merge_threshold=ex.ems_merge_threshold
        )
    rows = {}
    for name, comp in methods.items():
        ppl, agree, ratio, seconds = _evaluate(model, params, windows, comp, ex, full)
        rows[name] = (ppl, agree, ratio)
        res.metric(f"perplexity.{name}", ppl)
        res.metric(f"ppl_ratio.{name}", ppl / ppl_full)
        res.metric(f"agreement.{name}", agree)
        res.metric(f"compression.{name}", ratio)
        res.metric(f"seconds.{name}", seconds)
        print(
            f"{name:>10}: ppl {ppl:.4f} (fp16 {ppl_full:.4f}), agreement {agree:.4f}, "
            f"{ratio:.2f}x, {seconds:.1f}s"
        )

    # the bounds of the first three (and EMS's) have loose smoke values: enforced there too
    base = f"uniform{ex.bits}"
    gear_ppl, gear_agree, gear_ratio = rows["gear"]
    res.claim(
        f"GEAR {ex.bits}-bit compression ratio vs fp16 ≥",
        gear_ratio,
        ex.min_compression,
        ">=",
        smoke=True,
    )
    res.claim(
        "GEAR perplexity / fp16-cache perplexity <",
        gear_ppl / ppl_full,
        1 + ex.max_ppl_increase,
        smoke=True,
    )
    res.claim(
        "GEAR next-token agreement with fp16 cache ≥",
        gear_agree,
        ex.min_agreement,
        ">=",
        smoke=True,
    )
    res.claim(f"GEAR perplexity < uniform {ex.bits}-bit perplexity", gear_ppl, rows[base][0])
    res.claim(f"GEAR agreement > uniform {ex.bits}-bit agreement", gear_agree, rows[base][1], ">")
    if "ems" in rows:
        res.claim(
            "EMS compression ratio vs fp16 ≥",
            rows["ems"][2],
            ex.min_compression,
            ">=",
            smoke=True,
        )
        res.claim(
            "EMS perplexity / fp16-cache perplexity <",
            rows["ems"][0] / ppl_full,
            1 + ex.max_ppl_increase,
            smoke=True,
        )
    with ctx.figure("kv_cache.png", 1, 2, figsize=(9, 3.6)) as (fig, axes):
        _draw(rows, ppl_full, axes[0])


def _draw(rows, ppl_full, axes) -> None:
    for name, (ppl, agree, ratio) in rows.items():
        axes[0].scatter(ratio, ppl / ppl_full, label=name)
        axes[1].scatter(ratio, agree, label=name)
    axes[0].axhline(1.0, color="k", lw=1, ls="--")
    axes[0].set_ylabel("perplexity / fp16-cache perplexity")
    axes[1].set_ylabel("next-token agreement with fp16 cache")
    for ax in axes:
        ax.set_xlabel("KV compression ratio vs fp16")
    axes[1].legend(fontsize=8)
