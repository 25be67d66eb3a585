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
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from feynkit.core.checkpoint import save_checkpoint
from feynkit.experiments import train as tr
from feynkit.experiments.data import BYTE_VOCAB_SIZE, byte_decode, byte_encode, load_stdlib_corpus
from feynkit.experiments.metrics import bits_per_byte, ngram_nll
from feynkit.experiments.replications import register
from feynkit.experiments.results import Results
from feynkit.models import TransformerLM

CACHE_VERSION = 1  # bump when the training code changes what a config trains


@dataclasses.dataclass
class TrainLMConfig:
    name: str = "train_lm"
    cache_dir: str | None = None  # model cache (default $FEYNKIT_CACHE or ~/.cache/feynkit)
    max_corpus_bytes: int = 2_000_000
    split_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.8, 0.1, 0.1])
    # model
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_dim: int = 344
    seq_len: int = 128
    # training
    steps: int = 1000
    batch_size: int = 32
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    checkpoint_every: int = 400
    # evaluation
    max_eval_tokens: int = 200_000  # validation bytes scored (from the start of the split)
    eval_batch_size: int = 64
    sample_tokens: int = 200
    sample_temperature: float = 0.8
    prompt: str = "def "
    max_ppl_ratio: float = 0.5  # claim: validation perplexity < bigram perplexity × this


SMOKE = dict(
    max_corpus_bytes=300_000,
    d_model=32,
    num_layers=1,
    num_heads=2,
    mlp_dim=64,
    seq_len=32,
    steps=100,
    batch_size=16,
    checkpoint_every=100,
    max_eval_tokens=8192,
    sample_tokens=16,
    max_ppl_ratio=1e6,  # smoke runs check the pipeline, not the quality
)


def _model(ex: TrainLMConfig) -> TransformerLM:
    return TransformerLM(
        BYTE_VOCAB_SIZE,
        ex.d_model,
        ex.num_layers,
        ex.num_heads,
        mlp_dim=ex.mlp_dim,
        max_len=max(ex.seq_len, len(byte_encode(ex.prompt)) + ex.sample_tokens),
    )


def _defining_config(ex: TrainLMConfig, seed: int) -> dict:
    keep = (
        "max_corpus_bytes split_fractions d_model num_layers num_heads mlp_dim seq_len steps "
        "batch_size learning_rate warmup_steps weight_decay"
    ).split()
    return {
        "name": "train_lm-transformer",
        "version": CACHE_VERSION,
        "seed": seed,
        "data": "stdlib_corpus",
        **{k: getattr(ex, k) for k in keep},
    }


def train_lm(ex: TrainLMConfig, model: TransformerLM, tokens: np.ndarray, key, checkpoint_dir):
    params = model.init_params(jax.random.fold_in(key, 0))
    optimizer = tr.make_optimizer(ex.learning_rate, ex.steps, ex.warmup_steps, ex.weight_decay)
    t0 = time.perf_counter()
    state, history = tr.train(
        tr.next_token_loss(model.forward),
        optimizer,
        params,
        tr.window_batch_fn(ex.batch_size, ex.seq_len),
        jax.random.fold_in(key, 1),
        ex.steps,
        data=jnp.asarray(tokens),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=ex.checkpoint_every,
        log_every=20,
        steps_per_call=20,
        desc="lm",
    )
    seconds = time.perf_counter() - t0
    info = {"train_seconds": seconds, "history": history}
    if len(history) > 1:  # steady state: from the end of the first (compiling) chunk
        (s0, _, t_0), (s1, _, t_1) = history[0], history[-1]
        info["train_tokens_per_s"] = (s1 - s0) * ex.batch_size * ex.seq_len / (t_1 - t_0)
    return state.params, info


def trained_lm(
    ex: TrainLMConfig | None = None, seed: int = 0, corpus=None, smoke: bool = False
) -> tuple[TransformerLM, tr.CachedModel]:
    """The `train_lm` model and its parameters: from the model cache, or trained (and cached).

    Other replications (quantization, pruning, decoding) call this to share one trained LM;
    `ex` defaults to the `train_lm` experiment's default config; ``smoke=True`` applies the
    smoke settings (a small, quickly trained model for smoke runs).
    """
    ex = TrainLMConfig() if ex is None else ex
    if smoke:
        ex = dataclasses.replace(ex, **SMOKE)
    if corpus is None:
        corpus = load_stdlib_corpus(
            max_bytes=ex.max_corpus_bytes, fractions=tuple(ex.split_fractions)
        )
    model = _model(ex)
    key = jax.random.fold_in(jax.random.key(seed), 0)
    cached = tr.cached_train(
        _defining_config(ex, seed),
        functools.partial(train_lm, ex, model, corpus.train, key),
        directory=ex.cache_dir,
    )
    return model, cached


def validation_nll(model, params, tokens: np.ndarray, seq_len: int, batch_size: int):
    """Mean NLL (nats/token) over consecutive windows of seq_len + 1 tokens, the number of tokens
    scored, and the scoring throughput in tokens/s (compilation excluded)."""
    n_win = (len(tokens) - 1) // seq_len
    if n_win == 0:
        raise ValueError(f"need more than {seq_len} validation tokens, got {len(tokens)}.")
    idx = np.arange(n_win)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    windows = np.asarray(tokens)[idx].astype(np.int32)
    pad = (-n_win) % batch_size
    windows = np.concatenate([windows, np.zeros((pad, seq_len + 1), np.int32)])
    weights = np.concatenate([np.ones(n_win), np.zeros(pad)]).astype(np.float32)

    def batch_nll(params, w, mask):
        logits = model.forward(params, w[:, :-1])
        logp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(logp, w[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll.sum(-1) * mask)

    compiled = (
        jax.jit(batch_nll).lower(params, windows[:batch_size], weights[:batch_size]).compile()
    )
    t0 = time.perf_counter()
    total = 0.0
    for s in range(0, len(windows), batch_size):
        total += float(compiled(params, windows[s : s + batch_size], weights[s : s + batch_size]))
    tokens_per_s = len(windows) * seq_len / (time.perf_counter() - t0)
    return total / (n_win * seq_len), n_win * seq_len, tokens_per_s


def sample_text(model, params, key, prompt: str, num_tokens: int, temperature: float) -> str:
    """`prompt` and `num_tokens` bytes drawn after it at `temperature` (KV-cache decoding)."""
    prompt_tokens = jnp.asarray(byte_encode(prompt), jnp.int32)[None]
    p = prompt_tokens.shape[1]

    @jax.jit
    def generate(params, key):
        logits, cache = model.step(params, prompt_tokens, model.init_cache(1), 0)

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
    corpus = load_stdlib_corpus(max_bytes=ex.max_corpus_bytes, fractions=tuple(ex.split_fractions))
    res.metric("corpus_train_bytes", len(corpus.train))
    model, cached = trained_lm(ex, cfg.seed, corpus)
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
    nll, scored, eval_speed = validation_nll(model, params, val, ex.seq_len, ex.eval_batch_size)
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
