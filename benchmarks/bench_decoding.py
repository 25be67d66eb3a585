"""Wall-clock tokens/s of each decoder of the one decoding loop against the baseline, same run.

On the cached `train_lm` byte LM (``--smoke``: the smoke LM), a batch of held-out prompts is
decoded greedily for ``--new`` bytes by the baseline (one token per forward) and by each
decoder: speculative (a 1-layer draft, zoo.trained_draft_lm), Medusa (3 heads, a tree from
their accuracies) and aggressive decoding (on the copy task, against its own baseline). Each
number is the median of ``--repeats`` timed calls after a compiling call (`_timing.time_fn`).
Columns: tokens per target forward, tokens/s, and the ratio to the baseline of the same
prompts. Models train on the first run and are cached (FEYNKIT_CACHE).

    python benchmarks/bench_decoding.py                  # trained LM, batch 8, 64 new bytes
    python benchmarks/bench_decoding.py --smoke --batch 4 --new 32
"""

import argparse

import jax
import jax.numpy as jnp
from _timing import machine_line, time_fn

from feynkit.experiments.tasks.decode import (
    build_decoder,
    copy_prompts,
    load_byte_lm,
    text_prompts,
)
from feynkit.inference import decoding as dec

DECODERS = {
    "speculative": dict(
        name="speculative",
        num_draft=4,
        draft_d_model=64,
        draft_num_layers=1,
        draft_num_heads=2,
        draft_mlp_dim=172,
    ),
    "medusa": dict(
        name="medusa",
        num_heads=3,
        top_k=4,
        tree_size=24,
        train_steps=600,
        train_steps_smoke=60,
        acceptance="greedy",
        epsilon=0.09,
        delta=0.3,
    ),
    "aggressive": dict(name="aggressive", num_guess=12, match_len=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decoders", nargs="+", default=list(DECODERS))
    args = ap.parse_args()
    print(machine_line())
    model, params, corpus, lm_ex = load_byte_lm({}, args.smoke)
    text = text_prompts(corpus, args.batch, 32)
    copy, guides, glen = copy_prompts(corpus, args.batch, 64, 8, 3)

    def timed(decoder, prompts, inputs):
        fn = jax.jit(
            lambda p, x, inp: dec.generate(
                model, p, x, max_new_tokens=args.new, decoder=decoder, decoder_inputs=inp
            )
        )
        out = fn(params, prompts, inputs)
        seconds = time_fn(fn, (params, prompts, inputs), args.repeats, 0.5)
        generated = float(jnp.sum(out.lengths) - prompts.size)
        return generated / float(jnp.sum(out.num_forwards)), generated / seconds, out.tokens

    base = {
        "text": timed(dec.baseline_decoder(), text, None),
        "copy": timed(dec.baseline_decoder(), copy, None),
    }
    print(f"{'decoder':>14} {'prompts':>7} {'tok/fwd':>8} {'tok/s':>9} {'vs base':>8} same")
    for name, (tpf, tps, _) in base.items():
        print(f"{'baseline':>14} {name:>7} {tpf:8.2f} {tps:9.1f} {1.0:8.2f} yes")
    for name in args.decoders:
        decoder, _ = build_decoder(DECODERS[name], model, params, corpus, lm_ex, args.smoke)
        kind = "copy" if name == "aggressive" else "text"
        prompts, inputs = (copy, (guides, glen)) if kind == "copy" else (text, None)
        tpf, tps, tokens = timed(decoder, prompts, inputs)
        same = "yes" if bool(jnp.all(tokens == base[kind][2])) else "NO"
        ratio = tps / base[kind][1]
        print(f"{decoder.name:>14} {kind:>7} {tpf:8.2f} {tps:9.1f} {ratio:8.2f} {same}")


if __name__ == "__main__":
    main()
