"""LLM decoding: one incremental decoding loop over the KV cache and its accelerated decoders.

`generate` is the loop (a ``lax.while_loop``, batched, per-sequence positions and stopping, a
KV-cache compressor as a plain argument); a `Decoder` proposes a candidate `Tree` and accepts a
path of it per forward pass: `baseline_decoder` (one token), `speculative_decoder` (a draft
LM), `aggressive_decoder` (copies a guide text), `medusa_decoder` (`MedusaHeads`). Every
decoder's greedy output equals the baseline's; speculative and aggressive sampling preserve
the target distribution exactly.
"""

from feynkit.inference.decoding.decoders import (
    accept_chain,
    accept_greedy,
    accept_typical,
    aggressive_decoder,
    baseline_decoder,
    medusa_decoder,
    speculative_decoder,
)
from feynkit.inference.decoding.loop import (
    DecodeOutput,
    Decoder,
    KVCompressFn,
    forced_logits,
    generate,
)
from feynkit.inference.decoding.medusa import MedusaHeads, medusa_loss, medusa_topk_accuracy
from feynkit.inference.decoding.sampling import (
    SamplingConfig,
    filtered_log_probs,
    filtered_probs,
    sample_token,
)
from feynkit.inference.decoding.tree import (
    Tree,
    chain_tree,
    tree_from_accuracies,
    tree_from_paths,
)

__all__ = [
    "DecodeOutput",
    "Decoder",
    "KVCompressFn",
    "MedusaHeads",
    "SamplingConfig",
    "Tree",
    "accept_chain",
    "accept_greedy",
    "accept_typical",
    "aggressive_decoder",
    "baseline_decoder",
    "chain_tree",
    "filtered_log_probs",
    "filtered_probs",
    "forced_logits",
    "generate",
    "medusa_decoder",
    "medusa_loss",
    "medusa_topk_accuracy",
    "sample_token",
    "speculative_decoder",
    "tree_from_accuracies",
    "tree_from_paths",
]
