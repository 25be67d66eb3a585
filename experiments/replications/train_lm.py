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
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.checkpoint import save_checkpoint
from feynkit.experiments import train as tr
from feynkit.experiments import zoo
from feynkit.experiments.data import BYTE_VOCAB_SIZE, byte_decode, byte_encode
from feynkit.experiments.evaluation import windowed_nll
from feynkit.experiments.metrics import bits_per_byte, ngram_nll
from feynkit.experiments.replications import register
from feynkit.experiments.results import Results


@dataclasses.dataclass
class TrainLMConfig(zoo.LMConfig):
    name: str = "train_lm"
    # evaluation
    max_eval_tokens: int = 200_000  # validation bytes scored (from the start of the split)
    eval_batch_size: int = 64
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    prompt: str = "def "
    max_ppl_ratio: float = 0.5  # claim: validation perplexity < bigram perplexity × this


SMOKE = dict(
    **zoo.LM_SMOKE,
    max_eval_tokens=8192,
    sample_tokens=16,
    max_ppl_ratio=1e6,  # smoke runs check the pipeline, not the quality
)


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


@register("train_lm", TrainLMConfig)
def run(cfg, out_dir: Path) -> Results:
    ex = tr.experiment_config(cfg, TrainLMConfig, SMOKE)
    tr.quiet_checkpoint_logging()
    res = Results("train_lm", cfg.seed)
    key = jax.random.key(cfg.seed)
    corpus = zoo.lm_corpus(ex)
    res.metric("corpus_train_bytes", len(corpus.train))
    model, cached = zoo.trained_lm(ex, cfg.seed, corpus)
    params = cached.params
    save_checkpoint(Path(out_dir) / "checkpoints" / "transformer_lm", ex.steps, params)
    res.metric("cache_hit", float(cached.hit))
    for k in ("train_seconds", "train_tokens_per_s"):
        if k in cached.info:
            res.metric(k, cached.info[k])
    history = cached.info.get("history", [])
    if history:
        res.metric("final_train_loss", history[-1][1])

    val = corpus.validation[: ex.max_eval_tokens]
    nll, scored, eval_speed = windowed_nll(
        model.forward, params, val, ex.seq_len, ex.eval_batch_size
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
    (Path(out_dir) / "sample.txt").write_text(text)
    print(f"sample:\n{text}\n")
    res.figures.append(_plot(history, nll, bigram_nll, unigram_nll, out_dir))
    return res


def _plot(history, nll, bigram_nll, unigram_nll, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    path = Path(out_dir) / "train_lm.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
