"""Replication: input-guided aggressive decoding (Sun et al. 2021; Ge et al. 2022) on a
copy-heavy task with the byte LM.

Claims: the output is token-for-token the greedy baseline's, with fewer target forward passes.
Protocol: a held-out stdlib source snippet, a blank line and its first bytes form the prompt
(the LM continues by re-emitting the snippet); the guide is the snippet with ``num_edits``
bytes changed (the output departs from it there and the decoder re-aligns by the last
``match_len`` tokens). Reported: forward passes of both, tokens per forward, tokens/s.
"""

from __future__ import annotations

import dataclasses

from omegaconf import MISSING

from feynkit.experiments import harness
from feynkit.experiments.tasks.decode import (
    DecodeReplicationConfig,
    build_decoder,
    compare_decoders,
    copy_prompts,
    load_byte_lm,
)


@dataclasses.dataclass
class AggressiveConfig(DecodeReplicationConfig):
    """Schema of `configs/experiment/aggressive_decoding.yaml` (the values live there)."""

    snippet_len: int = MISSING
    copy_prefix: int = MISSING
    num_edits: int = MISSING
    num_guess: int = MISSING
    match_len: int = MISSING
    min_forward_reduction: float = MISSING  # baseline forwards / aggressive forwards

    def __post_init__(self):
        harness.require(
            0 < self.copy_prefix < self.snippet_len,
            "copy_prefix",
            f"must lie in (0, snippet_len = {self.snippet_len}).",
        )


@harness.replication("aggressive_decoding", AggressiveConfig)
def run(ex: AggressiveConfig, ctx: harness.Context) -> None:
    model, params, corpus, lm_ex = load_byte_lm({"cache_dir": ex.cache_dir}, ex.lm_smoke)
    prompts, guides, glen = copy_prompts(
        corpus, ex.num_prompts, ex.snippet_len, ex.copy_prefix, ex.num_edits, ctx.seed
    )
    spec = dict(name="aggressive", num_guess=ex.num_guess, match_len=ex.match_len)
    decoder, _ = build_decoder(spec, model, params, corpus, lm_ex, smoke=False)
    m = compare_decoders(model, params, prompts, decoder, ex.max_new_tokens, (guides, glen))
    for k, v in m.items():
        ctx.metric(k, v)
    reduction = m["tokens_per_forward"] / m["baseline_tokens_per_forward"]
    ctx.metric("forward_reduction", reduction)
    print(f"aggressive decoding: {m}")
    ctx.claim(
        "output identical to the greedy baseline (fraction) ≥",
        m["identical_fraction"],
        1.0,
        ">=",
        smoke=True,
    )
    ctx.claim(
        "baseline forward passes / aggressive forward passes >",
        reduction,
        ex.min_forward_reduction,
        ">",
    )
