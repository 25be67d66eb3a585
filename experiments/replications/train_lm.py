"""Training: a byte-level TransformerLM on the Python standard library's own source.

The corpus (`data.load_stdlib_corpus`, capped at `max_corpus_bytes`) is split by file into
train/validation/test; the model sees uniformly placed windows of the training stream. On the
validation stream, cut into consecutive windows of `seq_len` + 1 bytes, the run reports

    perplexity = exp(mean NLL),   bits per byte = mean NLL / ln 2,

next to the add-one smoothed bigram (and unigram) model fitted to the same training bytes, and
the training and evaluation throughput in tokens per second. A short continuation of a prompt,
decoded with the KV cache, is written to ``sample.txt``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import MISSING

from feynkit.core.checkpoint import save_checkpoint
from feynkit.experiments import harness, zoo
from feynkit.experiments import train as tr
from feynkit.experiments.data import BYTE_VOCAB_SIZE, byte_decode, byte_encode
from feynkit.experiments.evaluation import windowed_nll
from feynkit.experiments.metrics import bits_per_byte, ngram_nll


@dataclasses.dataclass
class TrainLMConfig(harness.ReplicationConfig, zoo.LMConfig):
    """Schema of `configs/experiment/train_lm.yaml`: the model fields of `zoo.LMConfig`
    (which define the cached model) and the evaluation."""

    max_eval_tokens: int = MISSING  # validation bytes scored (from the start of the split)
    eval_batch_size: int = MISSING
    sample_tokens: int = MISSING
    sample_temperature: float = MISSING
    prompt: str = MISSING
    max_ppl_ratio: float = MISSING  # claim: validation perplexity < bigram perplexity × this

    def __post_init__(self):
        harness.require(self.max_eval_tokens > 1, "max_eval_tokens", "must be > 1.")
        harness.require(self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1.")
        harness.require(self.sample_tokens >= 0, "sample_tokens", "must be >= 0.")
        harness.require(self.sample_temperature > 0, "sample_temperature", "must be > 0.")
        harness.require(len(self.prompt) > 0, "prompt", "must not be empty.")


def sample_text(model, params, key, prompt: str, num_tokens: int, temperature: float) -> str:
    """`prompt` and `num_tokens` bytes drawn after it at `temperature` (KV-cache decoding)."""
    prompt_tokens = jnp.asarray(byte_encode(prompt), jnp.int32)[None]
    p = prompt_tokens.shape[1]

    @jax.jit
    def generate(params, key):
        logits, cache = model.step(params, prompt_tokens, model.init_cache(1, p + num_tokens), 0)

        def body(carry, k):
            logits, cache, pos = carry
            tok = jax.random.categorical(k, logits / temperature)[:, None]
            logits, cache = model.step(params, tok, cache, pos)
            return (logits[:, -1], cache, pos + 1), tok[0, 0]

        carry = (logits[:, -1], cache, jnp.asarray(p, jnp.int32))
        _, toks = jax.lax.scan(body, carry, jax.random.split(key, num_tokens))
        return toks

    return prompt + byte_decode(np.asarray(generate(params, key)))


@harness.replication("train_lm", TrainLMConfig)
def run(ex: TrainLMConfig, ctx: harness.Context) -> None:
    """Train (or load) the zoo's LM and score it on the validation stream; with ``smoke=true``
    the model (and its corpus) is the zoo's smoke model (`zoo.LM_SMOKE`)."""
    tr.quiet_checkpoint_logging()
    res = ctx
    key = ctx.key
    lm = zoo.model_config(zoo.LMConfig, ex, smoke=ctx.smoke)  # what the model was trained with
    corpus = zoo.lm_corpus(lm)
    res.metric("corpus_train_bytes", len(corpus.train))
    model, cached = zoo.trained_lm(lm, ctx.seed, corpus)
    params = cached.params
    save_checkpoint(ctx.out_dir / "checkpoints" / "transformer_lm", 0, params)
    res.metric("cache_hit", float(cached.hit))
    for k in ("train_seconds", "train_tokens_per_s"):
        if k in cached.info:
            res.metric(k, cached.info[k])
    history = cached.info.get("history", [])
    if history:
        res.metric("final_train_loss", history[-1][1])

    val = corpus.validation[: ex.max_eval_tokens]
    nll, scored, eval_speed = windowed_nll(
        model.forward, params, val, lm.seq_len, ex.eval_batch_size
    )
    res.metric("eval_tokens_per_s", eval_speed)
    res.metric("validation_tokens", scored)
    ppl = res.metric("validation_perplexity", math.exp(nll))
    res.metric("validation_bits_per_byte", bits_per_byte(nll))
    bigram_nll = ngram_nll(corpus.train, val, 2, BYTE_VOCAB_SIZE, 1.0)
    bigram_ppl = res.metric("bigram_validation_perplexity", math.exp(bigram_nll))
    res.metric("bigram_validation_bits_per_byte", bits_per_byte(bigram_nll))
    unigram_nll = ngram_nll(corpus.train, val, 1, BYTE_VOCAB_SIZE, 1.0)
    res.metric("unigram_validation_perplexity", math.exp(unigram_nll))
    res.claim(
        f"validation perplexity < bigram's × {ex.max_ppl_ratio:g}",
        ppl,
        bigram_ppl * ex.max_ppl_ratio,
    )
    text = sample_text(
        model,
        params,
        jax.random.fold_in(key, 1),
        ex.prompt,
        ex.sample_tokens,
        ex.sample_temperature,
    )
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "sample.txt").write_text(text)
    print(f"sample:\n{text}\n")
    _plot(ctx, history, nll, bigram_nll, unigram_nll)


def _plot(ctx: harness.Context, history, nll, bigram_nll, unigram_nll) -> None:
    with ctx.figure("train_lm.png", figsize=(6, 4)) as (fig, axes):
        _draw(axes[0, 0], history, nll, bigram_nll, unigram_nll)


def _draw(ax, history, nll, bigram_nll, unigram_nll) -> None:
    if history:
        steps, losses = zip(*((h[0], h[1]) for h in history), strict=True)
        ax.plot(steps, np.asarray(losses) / math.log(2), label="train (per chunk)")
    for value, label, style in (
        (nll, "transformer, validation", "-"),
        (bigram_nll, "add-one bigram, validation", "--"),
        (unigram_nll, "add-one unigram, validation", ":"),
    ):
        ax.axhline(value / math.log(2), linestyle=style, color="k", lw=1, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=8)
