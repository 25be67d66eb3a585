"""Replication: speculative decoding with a small draft LM on the byte LM (Leviathan et al.
2023; Chen et al. 2023).

Claims (the papers'): speculative decoding leaves the output distribution unchanged — greedy
output is token-for-token the baseline's (the sampling case is tested exactly in
tests/inference/decoding) — and emits more than one token per target forward pass, more the
better the draft approximates the target: the acceptance rate α (accepted draft tokens per
draft token) grows with the draft's size. Protocol: held-out stdlib prompts, greedy decoding
with drafts of several widths (1 layer each, trained like the target, `zoo.trained_draft_lm`)
at γ draft tokens per step; plus one sampling run (temperature 1) per draft for α.
"""

from __future__ import annotations

import dataclasses

from omegaconf import MISSING

from feynkit.experiments import harness
from feynkit.experiments.tasks.decode import (
    DecodeReplicationConfig,
    build_decoder,
    compare_decoders,
    load_byte_lm,
    text_prompts,
    timed_generate,
)
from feynkit.inference.decoding import SamplingConfig, baseline_decoder


@dataclasses.dataclass
class SpeculativeConfig(DecodeReplicationConfig):
    """Schema of `configs/experiment/speculative.yaml` (the values live there)."""

    prompt_len: int = MISSING
    num_draft: int = MISSING  # γ
    draft_d_models: list[int] = MISSING  # one draft per width (1 layer, 2 heads)
    draft_mlp_ratio: float = MISSING
    temperature: float = MISSING  # the sampling run
    min_tokens_per_forward: float = MISSING  # claim for the largest draft, greedy

    def __post_init__(self):
        harness.require(self.num_draft >= 1, "num_draft", "must be >= 1.")
        harness.require(len(self.draft_d_models) >= 2, "draft_d_models", "needs >= 2 sizes.")


@harness.replication("speculative", SpeculativeConfig)
def run(ex: SpeculativeConfig, ctx: harness.Context) -> None:
    model, params, corpus, lm_ex = load_byte_lm({"cache_dir": ex.cache_dir}, ex.lm_smoke)
    prompts = text_prompts(corpus, ex.num_prompts, ex.prompt_len)
    alphas, rows = [], {}
    sampling = SamplingConfig(ex.temperature)
    base_greedy = timed_generate(model, params, prompts, baseline_decoder(), ex.max_new_tokens)
    base_sampled = timed_generate(
        model, params, prompts, baseline_decoder(), ex.max_new_tokens, sampling=sampling
    )
    for d in ex.draft_d_models:
        spec = dict(
            name="speculative",
            num_draft=ex.num_draft,
            draft_d_model=d,
            draft_num_layers=1,
            draft_num_heads=2,
            draft_mlp_dim=int(ex.draft_mlp_ratio * d),
        )
        decoder, info = build_decoder(spec, model, params, corpus, lm_ex, smoke=False)
        greedy = compare_decoders(
            model, params, prompts, decoder, ex.max_new_tokens, baseline=base_greedy
        )
        sampled = compare_decoders(
            model,
            params,
            prompts,
            decoder,
            ex.max_new_tokens,
            sampling=sampling,
            baseline=base_sampled,
        )
        alpha = (sampled["tokens_per_forward"] - 1.0) / ex.num_draft
        alphas.append(alpha)
        tag = f"d{d}"
        ctx.metric(f"{tag}.draft_params_fraction", info["target_over_draft_params"] ** -1)
        for k, v in greedy.items():
            ctx.metric(f"{tag}.greedy.{k}", v)
        ctx.metric(f"{tag}.sampled.tokens_per_forward", sampled["tokens_per_forward"])
        ctx.metric(f"{tag}.sampled.acceptance_rate", alpha)
        ctx.metric(f"{tag}.sampled.speedup", sampled["speedup"])
        rows[d] = (greedy["tokens_per_forward"], alpha)
        ctx.claim(
            f"draft d={d}: greedy output identical to the baseline (fraction) ≥",
            greedy["identical_fraction"],
            1.0,
            ">=",
            smoke=True,
        )
        print(f"draft d_model={d}: greedy {greedy}, sampled α={alpha:.3f}")
    largest = max(ex.draft_d_models)
    ctx.claim(
        f"largest draft (d={largest}): greedy tokens per target forward >",
        rows[largest][0],
        ex.min_tokens_per_forward,
        ">",
    )
    ctx.claim(
        "acceptance rate (T=1) of the largest draft > the smallest's",
        alphas[ex.draft_d_models.index(largest)],
        alphas[ex.draft_d_models.index(min(ex.draft_d_models))],
        ">",
    )
    with ctx.figure("speculative.png", 1, 2) as (fig, axes):
        ds = sorted(rows)
        axes[0, 0].plot(ds, [rows[d][0] for d in ds], "o-")
        axes[0, 0].set_xlabel("draft d_model")
        axes[0, 0].set_ylabel("tokens per target forward (greedy)")
        axes[0, 1].plot(ds, [rows[d][1] for d in ds], "o-")
        axes[0, 1].set_xlabel("draft d_model")
        axes[0, 1].set_ylabel(f"acceptance rate α (T={ex.temperature:g})")
