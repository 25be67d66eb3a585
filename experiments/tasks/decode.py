"""task=decode: byte LM × decoder → identical-output check, tokens per forward pass, tokens/s.

    python -m feynkit.experiments.run task=decode decoder=speculative
    python -m feynkit.experiments.run task=decode decoder=medusa decoder.tree_size=16

The trained byte LM (`model=byte_lm`) decodes prompts from held-out stdlib source greedily with
the baseline incremental decoder and with ``decoder`` (configs/decoder: baseline, speculative,
medusa, aggressive), both through `feynkit.inference.decoding.generate`. Reported: the fraction
of sequences whose tokens equal the baseline's, generated tokens per target forward pass, and
wall-clock tokens/s of both (timed after a compiling call, same run). The aggressive decoder
gets a copy task: a source snippet, a blank line and the snippet's first bytes as the prompt
(the LM continues by copying), the snippet with a few bytes edited as its guide.

The replications `speculative`, `medusa` and `aggressive_decoding` call `build_decoder` and
`compare_decoders` of this module.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING, DictConfig, OmegaConf

from feynkit.experiments import harness
from feynkit.experiments.tasks.common import task_settings

__all__ = [
    "DecodeReplicationConfig",
    "DecodeTask",
    "build_decoder",
    "compare_decoders",
    "copy_prompts",
    "load_byte_lm",
    "run_decode",
    "text_prompts",
    "timed_generate",
]


@dataclasses.dataclass
class DecodeTask:
    """The ``task`` node of task=decode."""

    name: str = "decode"
    num_prompts: int = 8
    prompt_len: int = 32
    max_new_tokens: int = 64
    snippet_len: int = 48  # aggressive: bytes of the copied snippet
    copy_prefix: int = 8  # aggressive: the snippet's first bytes repeated in the prompt
    num_edits: int = 3  # aggressive: bytes changed in the guide
    min_identical: float = 1.0  # claim: fraction of sequences equal to the baseline's
    smoke_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class DecodeReplicationConfig(harness.ReplicationConfig):
    """Keys the decoding replications share (speculative, medusa, aggressive_decoding)."""

    cache_dir: str | None = MISSING  # model cache of the trained LM
    lm_smoke: bool = MISSING  # the zoo's smoke LM instead of the trained `train_lm` one
    num_prompts: int = MISSING  # decoded in one batch
    max_new_tokens: int = MISSING


def load_byte_lm(model_fields: dict, smoke: bool, seed: int = 0):
    """(model, params, corpus, LMConfig) of the zoo's byte LM for ``model=byte_lm`` fields."""
    from feynkit.experiments import zoo

    fields = {k: v for k, v in model_fields.items() if not k.startswith("_")}
    ex = zoo.model_config(zoo.LMConfig, zoo.LMConfig(**fields), smoke)
    corpus = zoo.lm_corpus(ex)
    model, cached = zoo.trained_lm(ex, seed, corpus)
    return model, cached.params, corpus, ex


def text_prompts(corpus, num: int, length: int) -> jax.Array:
    """``num`` consecutive held-out windows of ``length`` bytes."""
    from feynkit.experiments.evaluation import scoring_windows

    return jnp.asarray(scoring_windows(corpus.validation, length, num)[:, :length])


def copy_prompts(corpus, num: int, snippet_len: int, prefix: int, edits: int, seed: int = 0):
    """(prompts, guides, guide lengths) of the copy task: prompt = snippet + b"\\n\\n" +
    snippet[:prefix]; guide = snippet with ``edits`` bytes replaced by other letters."""
    from feynkit.experiments.evaluation import scoring_windows

    rng = np.random.default_rng(seed)
    snippets = scoring_windows(corpus.validation, snippet_len, num, start=snippet_len)
    snippets = snippets[:, :snippet_len]
    sep = np.frombuffer(b"\n\n", np.uint8).astype(np.int32)
    prompts = np.concatenate(
        [snippets, np.tile(sep, (num, 1)), snippets[:, :prefix]], axis=1
    ).astype(np.int32)
    guides = snippets.copy()
    for row in guides:
        for pos in rng.choice(np.arange(prefix, snippet_len), edits, replace=False):
            row[pos] = ord("a") + (row[pos] - ord("a") + 1 + rng.integers(25)) % 26
    return jnp.asarray(prompts), jnp.asarray(guides), jnp.full((num,), snippet_len, jnp.int32)


# The ``decoder=`` options' factories: each returns its arguments, the spec `build_decoder` reads.


def baseline(name: str = "baseline") -> dict:
    """decoder=baseline: one token per forward pass."""
    return dict(locals())


def speculative(
    name: str = "speculative",
    num_draft: int = 4,
    draft_d_model: int = 64,
    draft_num_layers: int = 1,
    draft_num_heads: int = 2,
    draft_mlp_dim: int = 172,
) -> dict:
    """decoder=speculative: a `zoo.trained_draft_lm` of this architecture, γ = num_draft."""
    return dict(locals())


def medusa(
    name: str = "medusa",
    num_heads: int = 3,
    top_k: int = 4,
    tree_size: int = 24,
    train_steps: int = 600,
    train_steps_smoke: int = 60,
    acceptance: str = "greedy",
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> dict:
    """decoder=medusa: `zoo.trained_medusa_heads`, a tree from their top-k accuracies."""
    return dict(locals())


def aggressive(name: str = "aggressive", num_guess: int = 12, match_len: int = 4) -> dict:
    """decoder=aggressive: input-guided aggressive decoding."""
    return dict(locals())


def build_decoder(spec: dict, model, params, corpus, lm_ex, smoke: bool, seed: int = 0):
    """(the `Decoder` a ``decoder=`` option describes, metrics of building it)."""
    from feynkit.experiments import zoo
    from feynkit.inference import decoding as dec

    name = spec["name"]
    info: dict[str, float] = {}
    if name == "baseline":
        return dec.baseline_decoder(), info
    if name == "speculative":
        arch = dict(
            d_model=int(spec["draft_d_model"]),
            num_layers=int(spec["draft_num_layers"]),
            num_heads=int(spec["draft_num_heads"]),
            mlp_dim=int(spec["draft_mlp_dim"]),
        )
        if smoke:  # the smoke LM is tiny already: half its width, one layer
            arch = dict(d_model=lm_ex.d_model // 2, num_layers=1, num_heads=2, mlp_dim=32)
        draft, cached = zoo.trained_draft_lm(lm_ex, seed, corpus, **arch)
        size = lambda p: sum(x.size for x in jax.tree.leaves(p))  # noqa: E731
        info["target_over_draft_params"] = size(params) / size(cached.params)
        decoder = dec.speculative_decoder(
            draft, cached.params, int(spec["num_draft"]), vocab_size=model.vocab_size
        )
        return decoder, info
    if name == "medusa":
        heads, cached = zoo.trained_medusa_heads(
            lm_ex,
            model,
            params,
            corpus,
            num_heads=int(spec["num_heads"]),
            steps=int(spec["train_steps_smoke" if smoke else "train_steps"]),
        )
        windows = text_prompts(corpus, 32, lm_ex.seq_len + 1)
        _, _, hidden = model.apply({"params": params}, windows[:, :-1], return_hidden=True)
        acc = np.asarray(
            dec.medusa_topk_accuracy(heads, cached.params, hidden, windows, int(spec["top_k"]))
        )
        for d in range(acc.shape[0]):
            info[f"head{d + 1}_top1_accuracy"] = float(acc[d, 0])
        tree = dec.tree_from_accuracies(acc, int(spec["tree_size"]))
        info["tree_depth"] = tree.depth
        info["expected_accepted_per_forward"] = 1.0 + float(
            sum(np.prod([acc[d, c] for d, c in enumerate(p)]) for p in tree.paths)
        )
        decoder = dec.medusa_decoder(
            heads.logits,
            cached.params,
            tree,
            num_heads=int(spec["num_heads"]),
            acceptance=str(spec["acceptance"]),
            epsilon=float(spec["epsilon"]),
            delta=float(spec["delta"]),
        )
        return decoder, info
    if name == "aggressive":
        decoder = dec.aggressive_decoder(int(spec["num_guess"]), match_len=int(spec["match_len"]))
        return decoder, info
    raise ValueError(f"decoder.name must be baseline, speculative, medusa or aggressive: {name}.")


def _timed(fn, *args, repeats: int = 3):
    """(output, median seconds of ``repeats`` calls after the compiling one)."""
    out = jax.block_until_ready(fn(*args))  # compile
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - t0)
    return out, float(np.median(seconds))


def timed_generate(
    model, params, prompts, decoder, max_new_tokens: int, decoder_inputs=None, sampling=None
):
    """(`DecodeOutput`, seconds of a call after the compiling one) of jitted `generate`."""
    from feynkit.inference import decoding as dec

    key = jax.random.key(0)
    fn = jax.jit(
        lambda p, x, inp: dec.generate(
            model,
            p,
            x,
            max_new_tokens=max_new_tokens,
            decoder=decoder,
            decoder_inputs=inp,
            sampling=sampling,
            key=key,
        )
    )
    return _timed(fn, params, prompts, decoder_inputs)


def compare_decoders(
    model,
    params,
    prompts,
    decoder,
    max_new_tokens: int,
    decoder_inputs=None,
    sampling=None,
    baseline=None,
) -> dict[str, float]:
    """Greedy (or ``sampling``) decoding with the baseline and ``decoder``, same prompts: the
    fraction identical, tokens per target forward, tokens/s of both and their ratio.
    ``baseline``: a `timed_generate` result of the baseline to reuse (same settings)."""
    from feynkit.inference import decoding as dec

    if baseline is None:
        baseline = timed_generate(
            model, params, prompts, dec.baseline_decoder(), max_new_tokens, None, sampling
        )
    base, t_base = baseline
    out, t_dec = timed_generate(
        model, params, prompts, decoder, max_new_tokens, decoder_inputs, sampling
    )
    generated = float(jnp.sum(out.lengths) - prompts.size)
    base_generated = float(jnp.sum(base.lengths) - prompts.size)
    same = np.all(np.asarray(out.tokens) == np.asarray(base.tokens), axis=1)
    return {
        "identical_fraction": float(same.mean()),
        "tokens_per_forward": generated / float(jnp.sum(out.num_forwards)),
        "baseline_tokens_per_forward": base_generated / float(jnp.sum(base.num_forwards)),
        "tokens_per_s": generated / t_dec,
        "baseline_tokens_per_s": base_generated / t_base,
        "speedup": (generated / t_dec) / (base_generated / t_base),
    }


def run_decode(cfg: DictConfig, ctx: Any) -> None:
    """Decode with ``cfg.decoder`` against the baseline on the byte LM (see the module)."""
    if cfg.get("decoder") is None:
        raise ValueError("task=decode needs a decoder option; add decoder=<option>.")
    if str(cfg.model.get("_target_", "")).rpartition(".")[2] != "byte_lm":
        raise ValueError("task=decode runs on model=byte_lm.")
    s = task_settings(cfg, ctx.smoke)
    spec = OmegaConf.to_container(cfg.decoder, resolve=True)
    model_fields = OmegaConf.to_container(cfg.model, resolve=True)
    model, params, corpus, lm_ex = load_byte_lm(model_fields, ctx.smoke, ctx.seed)
    decoder, info = build_decoder(spec, model, params, corpus, lm_ex, ctx.smoke, ctx.seed)
    for k, v in info.items():
        ctx.metric(k, v)
    inputs = None
    if spec["name"] == "aggressive":
        prompts, guides, glen = copy_prompts(
            corpus, s.num_prompts, s.snippet_len, s.copy_prefix, s.num_edits, ctx.seed
        )
        inputs = (guides, glen)
    else:
        prompts = text_prompts(corpus, s.num_prompts, s.prompt_len)
    m = compare_decoders(model, params, prompts, decoder, s.max_new_tokens, inputs)
    for k, v in m.items():
        ctx.metric(k, v)
    print(f"{decoder.name}: {m}")
    ctx.claim(
        f"{decoder.name} greedy output identical to the baseline's (fraction) ≥",
        m["identical_fraction"],
        s.min_identical,
        ">=",
    )
