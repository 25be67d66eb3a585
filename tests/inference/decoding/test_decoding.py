"""The one decoding loop and its decoders: exactness against brute force and the baseline."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from feynkit.inference import decoding as dec
from feynkit.models import TransformerLM

V = 12


def _init(model, seed, scale=1.0):
    """Parameters scaled by ``scale`` (one compiled init: eager init costs seconds per model)."""
    return jax.jit(lambda k: jax.tree.map(lambda x: scale * x, model.init_params(k)))(
        jax.random.key(seed)
    )


def _generate(model, params, prompt, *, decoder_inputs=None, prompt_lengths=None, key=None, **kw):
    """`dec.generate` compiled as one program (cheaper than its eager prefill op by op)."""
    fn = jax.jit(
        lambda p, x, inp, lens, k: dec.generate(
            model, p, x, decoder_inputs=inp, prompt_lengths=lens, key=k, **kw
        )
    )
    return fn(params, prompt, decoder_inputs, prompt_lengths, key)


@pytest.fixture(scope="module")
def lm():
    model = TransformerLM(V, 32, 2, 2, mlp_dim=48, max_len=64)
    # sharpened random weights: a peaked, prompt-dependent next-token distribution
    return model, _init(model, 0, 3.0)


def _greedy_reference(model, params, prompt, length, steps, eos):
    """Greedy decoding by full forward passes (NumPy argmax), one sequence."""
    seq = list(np.asarray(prompt[:length]))
    forward = jax.jit(model.forward)  # causal: the zero padding after the sequence is unread
    width = len(prompt) + steps
    for _ in range(steps):
        padded = jnp.asarray([seq + [0] * (width - len(seq))])
        logits = np.asarray(forward(params, padded), np.float64)[0, len(seq) - 1]
        seq.append(int(np.argmax(logits)))
        if seq[-1] == eos:
            break
    return seq


def test_tree_mask_and_positions_against_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        nodes = set()
        for _ in range(rng.integers(1, 12)):
            depth = rng.integers(1, 4)
            path = tuple(int(c) for c in rng.integers(0, 3, depth))
            nodes.update(path[:d] for d in range(1, depth + 1))
        tree = dec.tree_from_paths(sorted(nodes))
        order = [()] + list(tree.paths)
        for i, pi in enumerate(order):
            assert tree.depths[i] == len(pi)
            for j, pj in enumerate(order):
                assert tree.mask[i, j] == (pi[: len(pj)] == pj)
            for d in range(tree.depth + 1):
                assert order[tree.ancestors[i, d]] == pi[: min(d, len(pi))]


def test_tree_from_accuracies_is_optimal():
    rng = np.random.default_rng(1)
    acc = np.sort(rng.uniform(0.05, 0.9, (3, 2)), axis=1)[:, ::-1]
    universe = [p for d in (1, 2, 3) for p in itertools.product(range(2), repeat=d)]
    value = {p: np.prod([acc[d, c] for d, c in enumerate(p)]) for p in universe}
    for size in (1, 3, 5):
        best = max(
            sum(value[p] for p in subset)
            for subset in itertools.combinations(universe, size)
            if all(p[:-1] in subset or len(p) == 1 for p in subset)
        )
        tree = dec.tree_from_accuracies(acc, size)
        assert sum(value[p] for p in tree.paths) == pytest.approx(best)


def test_filtered_probs_against_numpy():
    logits = np.random.default_rng(2).normal(size=(5, 9)) * 2
    cfg = dec.SamplingConfig(0.7, top_k=6, top_p=0.8)
    got = np.asarray(dec.filtered_probs(jnp.asarray(logits), cfg))
    for row, g in zip(logits, got, strict=True):
        z = row / 0.7
        keep = np.zeros(9, bool)
        keep[np.argsort(-z)[:6]] = True
        p = np.where(keep, np.exp(z - z.max()), 0)
        p /= p.sum()
        order = np.argsort(-p)
        before = np.cumsum(p[order]) - p[order]
        nucleus = np.zeros(9, bool)
        nucleus[order[before < 0.8]] = True
        ref = np.where(nucleus, p, 0)
        np.testing.assert_allclose(g, ref / ref.sum(), atol=1e-6)


def test_tree_verification_logits_equal_sequential(lm):
    """One tree pass (mask + positions against the cache) gives every node the logits of the
    full forward pass over the prefix and its path."""
    model, params = lm
    tree = dec.tree_from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    prefix = jnp.asarray([[3, 1, 4, 1, 5]])
    toks = jnp.asarray([9, 2, 6, 5, 3, 5, 8])  # root + 6 candidates
    cache = model.init_cache(1, 32)
    _, cache = jax.jit(lambda p, x, c: model.step(p, x, c, 0))(params, prefix[:, :4], cache)
    start = 4
    toks = toks.at[0].set(prefix[0, 4])
    logits, _ = jax.jit(
        lambda p, t, c: model.step(
            p,
            t,
            c,
            start,
            positions=start + jnp.asarray(tree.depths),
            chunk_mask=jnp.asarray(tree.mask),
        )
    )(params, toks[None], cache)
    forward = jax.jit(model.forward)
    for i in range(tree.size):
        path = [int(toks[j]) for j in tree.ancestors[i][: tree.depths[i] + 1]]
        full = forward(params, jnp.concatenate([prefix[0, :4], jnp.asarray(path)])[None])
        np.testing.assert_allclose(logits[0, i], full[0, -1], atol=2e-4)


def test_every_decoder_greedy_equals_baseline_and_reference(lm):
    """Greedy output of every decoder == the baseline's == a full-forward argmax reference
    (batch 8, prompt lengths 1..6, EOS, padding)."""
    model, params = lm
    b, p, steps, eos = 8, 6, 10, 7
    prompt = jax.random.randint(jax.random.key(3), (b, p), 0, V)
    lengths = jnp.asarray([6, 1, 3, 6, 2, 5, 6, 4])
    ref = [
        _greedy_reference(model, params, prompt[i], int(lengths[i]), steps, eos) for i in range(b)
    ]
    kw = dict(max_new_tokens=steps, prompt_lengths=lengths, eos_id=eos, pad_id=-1)
    base = _generate(model, params, prompt, decoder=dec.baseline_decoder(), **kw)
    for i in range(b):
        assert list(np.asarray(base.tokens[i, : base.lengths[i]])) == ref[i]
    assert np.all(np.asarray(base.tokens[0, base.lengths[0] :]) == -1)

    draft = TransformerLM(V, 16, 1, 2, mlp_dim=24, max_len=64)
    dparams = _init(draft, 4)
    heads = dec.MedusaHeads(3, V)
    hparams = heads.init_from_lm(jax.random.key(5), params["lm_head"]["kernel"])
    tree = dec.tree_from_accuracies(
        np.array([[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.1]]), 7
    )
    guides, guide_lengths = [], []
    for i, r in enumerate(ref):  # the reference output with two tokens inserted (an edit)
        cut = int(lengths[i]) + 4
        g = r[:cut] + [1, 2] + r[cut:]
        guides.append(g + [0] * (24 - len(g)))
        guide_lengths.append(len(g))
    guide = (jnp.asarray(guides), jnp.asarray(guide_lengths))
    runs = {
        "speculative": (dec.speculative_decoder(draft, dparams, 3, vocab_size=V), None),
        "medusa": (dec.medusa_decoder(heads.logits, hparams, tree, num_heads=3), None),
        "aggressive": (dec.aggressive_decoder(4, match_len=2), guide),
    }
    for name, (decoder, inputs) in runs.items():
        out = _generate(model, params, prompt, decoder=decoder, decoder_inputs=inputs, **kw)
        np.testing.assert_array_equal(out.tokens, base.tokens, err_msg=name)
        np.testing.assert_array_equal(out.lengths, base.lengths, err_msg=name)
    # the guide copies most of the reference: aggressive decoding needs fewer forward passes
    assert out.num_forwards.sum() < base.num_forwards.sum()


def _exact_two_token_distribution(model, params, prefix, cfg):
    """p(x1, x2 | prefix) of the filtered target, by enumeration."""
    table = np.zeros((V4, V4))
    first = np.asarray(dec.filtered_probs(model.forward(params, prefix[None])[0, -1], cfg))
    seqs = jnp.asarray([list(prefix) + [a] for a in range(V4)])
    second = np.asarray(dec.filtered_probs(model.forward(params, seqs)[:, -1], cfg))
    table = first[:, None] * second
    return table.reshape(-1)


def _check_two_token_law(model, params, prefix, n, decoder, sampling, key, exact):
    """Draw n two-token continuations with ``decoder``; χ² goodness of fit against ``exact``
    (16 cells, α = 1e-3), no draw outside its support. Returns (output, support, df)."""
    out = _generate(
        model,
        params,
        jnp.tile(prefix, (n, 1)),
        max_new_tokens=2,
        decoder=decoder,
        sampling=sampling,
        key=key,
    )
    cells = np.asarray(out.tokens[:, 2] * V4 + out.tokens[:, 3])
    counts = np.bincount(cells, minlength=V4 * V4)
    support = exact > 0
    assert counts[~support].sum() == 0
    chi2 = np.sum((counts[support] - n * exact[support]) ** 2 / (n * exact[support]))
    df = support.sum() - 1
    assert scipy.stats.chi2.sf(chi2, df) > 1e-3, chi2
    return out, support, df


V4 = 4


@pytest.mark.parametrize(
    "cfg",
    [
        dec.SamplingConfig(1.0),
        pytest.param(dec.SamplingConfig(0.8, top_k=3), marks=pytest.mark.slow),
    ],
)
def test_speculative_sampling_preserves_target_distribution(cfg):
    """χ² goodness of fit of 6000 two-token continuations (16 cells) against the exact filtered
    target; α = 1e-3. Power: sampling from the draft instead has noncentrality λ > 100, so the
    test would reject it with probability > 0.999."""
    target = TransformerLM(V4, 16, 1, 2, mlp_dim=16, max_len=16)
    tparams = _init(target, 6, 4.0)
    draft = TransformerLM(V4, 8, 1, 2, mlp_dim=8, max_len=16)
    dparams = _init(draft, 7, 4.0)
    n, prefix = 6000, jnp.asarray([1, 3])
    exact = _exact_two_token_distribution(target, tparams, prefix, cfg)
    exact_draft = _exact_two_token_distribution(draft, dparams, prefix, cfg)
    decoder = dec.speculative_decoder(draft, dparams, 2, vocab_size=V4)
    out, support, df = _check_two_token_law(
        target, tparams, prefix, n, decoder, cfg, jax.random.key(8), exact
    )
    lam = n * np.sum((exact_draft[support] - exact[support]) ** 2 / exact[support])
    assert scipy.stats.ncx2.sf(scipy.stats.chi2.isf(1e-3, df), df, lam) > 0.999
    # the draft was used: some tokens came two per target forward
    assert out.num_forwards.mean() < 2


def test_bad_input_is_refused(lm):
    model, params = lm
    base = dec.baseline_decoder()
    with pytest.raises(ValueError, match="prompt"):
        dec.generate(model, params, jnp.zeros((2, 0), jnp.int32), max_new_tokens=3, decoder=base)
    with pytest.raises(ValueError, match="cache_len"):
        dec.generate(
            model,
            params,
            jnp.zeros((1, 30), jnp.int32),
            max_new_tokens=8,
            decoder=base,
            cache_len=32,
        )
    with pytest.raises(ValueError, match="prompt_lengths"):
        dec.generate(
            model,
            params,
            jnp.zeros((2, 4), jnp.int32),
            max_new_tokens=3,
            decoder=base,
            prompt_lengths=jnp.asarray([0, 4]),
        )
    heads = dec.MedusaHeads(2, V)
    with pytest.raises(ValueError, match="num_heads"):
        dec.medusa_decoder(heads.logits, {}, dec.chain_tree(3), num_heads=2)
    other = TransformerLM(V + 1, 16, 1, 2, mlp_dim=24)
    with pytest.raises(ValueError, match="vocab_size"):
        dec.speculative_decoder(other, {}, 2, vocab_size=V)
    with pytest.raises(ValueError, match="temperature"):
        dec.SamplingConfig(-1.0).validate()
    with pytest.raises(ValueError, match="key"):
        dec.generate(
            model,
            params,
            jnp.zeros((1, 2), jnp.int32),
            max_new_tokens=2,
            decoder=base,
            sampling=dec.SamplingConfig(1.0),
        )


def test_forced_logits_equal_full_forward(lm):
    model, params = lm
    tokens = jax.random.randint(jax.random.key(9), (2, 20), 0, V)
    full = jax.jit(model.forward)(params, tokens)[:, 12:]
    for chunk in (None, 3):
        forced = jax.jit(lambda p, t: dec.forced_logits(model, p, t, prefix_len=12, chunk=chunk))  # noqa: B023
        logits, stats = forced(params, tokens)
        assert stats is None
        np.testing.assert_allclose(logits, full, rtol=1e-4, atol=1e-3)


def test_kv_compress_hook_is_applied(lm):
    """A hook that zeroes the prompt's cached values changes the output; its stats are summed."""
    model, params = lm
    prompt = jax.random.randint(jax.random.key(10), (2, 8), 0, V)

    def zero_values(cache, tokens, start, stop):
        v = cache.v.at[:, :, start:stop].set(0.0)
        return cache._replace(v=v), jnp.asarray(stop - start, jnp.float32)

    kw = dict(max_new_tokens=6, decoder=dec.baseline_decoder())
    plain = _generate(model, params, prompt, **kw)
    hooked = _generate(model, params, prompt, kv_compress=zero_values, **kw)
    assert float(hooked.kv_stats) == 2 * 7
    assert not np.array_equal(plain.tokens, hooked.tokens)


def test_accept_typical_against_brute_force():
    """Deterministic typical acceptance: the deepest path whose every token has p > min(ε,
    δ·exp(−H)) under its parent's tempered distribution (ties: the most probable path)."""
    tree = dec.tree_from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (1, 0, 0)])
    rng = np.random.default_rng(11)
    cfg = dec.SamplingConfig(0.8)
    eps, delta = 0.2, 0.5
    for trial in range(10):
        logits = rng.normal(size=(tree.size, 6)) * 2
        tokens = rng.integers(0, 6, tree.size)
        tokens[1:4] = np.argsort(-logits[0])[:3]  # siblings distinct, some likely
        z = logits / 0.8
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        tau = np.minimum(eps, delta * np.exp(np.sum(p * np.log(p), 1)))
        best, best_key = 0, (0, 1.0)
        for i in range(1, tree.size):
            chain = list(tree.ancestors[i][1 : tree.depths[i] + 1])
            ok = all(p[tree.parents[j], tokens[j]] > tau[tree.parents[j]] for j in chain)
            prob = np.prod([p[tree.parents[j], tokens[j]] for j in chain])
            if ok and (tree.depths[i], prob) > best_key:
                best, best_key = i, (tree.depths[i], prob)
        node, _ = dec.accept_typical(
            jax.random.key(trial),
            tree,
            jnp.asarray(logits, jnp.float32),
            jnp.asarray(tokens),
            cfg,
            epsilon=eps,
            delta=delta,
            sampled=False,
        )
        assert int(node) == best


def _typical_probs(logits, temperature, eps, delta):
    """NumPy float64: the tempered target truncated to its typical set {p ≥ min(ε, δ e^{−H})}."""
    z = np.asarray(logits, np.float64) / temperature
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    entropy = -np.sum(p * np.log(p), -1, keepdims=True)
    keep = (p >= np.minimum(eps, delta * np.exp(-entropy))) | (p == p.max(-1, keepdims=True))
    q = np.where(keep, p, 0.0)
    return q / q.sum(-1, keepdims=True)


def test_medusa_typical_sampling_is_exact_typical_sampling():
    """Medusa's sampling-form typical acceptance, batch 6000 at T = 0.8: the two-token output
    follows sequential sampling from the typical-truncated target (χ², 16 cells, α = 1e-3;
    truncated tokens never appear), and candidates were accepted (< 2 forwards per 2 tokens).
    Power: draws from the untruncated target would hit a truncated cell w.p. > 0.999."""
    target = TransformerLM(V4, 16, 1, 2, mlp_dim=16, max_len=16)
    tparams = _init(target, 12)  # 10 of 16 cells typical
    heads = dec.MedusaHeads(2, V4)
    hparams = heads.init_from_lm(jax.random.key(13), tparams["lm_head"]["kernel"])
    tree = dec.tree_from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    t, eps, delta = 0.8, 0.15, 0.4
    n, prefix = 6000, jnp.asarray([2, 0])
    first = _typical_probs(target.forward(tparams, prefix[None])[0, -1], t, eps, delta)
    seqs = jnp.asarray([[2, 0, a] for a in range(V4)])
    second = _typical_probs(target.forward(tparams, seqs)[:, -1], t, eps, delta)
    exact = (first[:, None] * second).reshape(-1)
    full = np.asarray(
        dec.filtered_probs(target.forward(tparams, prefix[None])[0, -1], dec.SamplingConfig(t))
    )
    full2 = np.asarray(
        dec.filtered_probs(target.forward(tparams, seqs)[:, -1], dec.SamplingConfig(t))
    )
    untruncated = (full[:, None] * full2).reshape(-1)
    decoder = dec.medusa_decoder(
        heads.logits,
        hparams,
        tree,
        num_heads=2,
        acceptance="typical_sampling",
        epsilon=eps,
        delta=delta,
    )
    out, support, _ = _check_two_token_law(
        target, tparams, prefix, n, decoder, dec.SamplingConfig(t), jax.random.key(14), exact
    )
    # power: the untruncated target puts mass m outside the typical set, so 6000 of its draws
    # would all avoid it with probability (1 - m)^n < 1e-3
    assert (1 - untruncated[~support].sum()) ** n < 1e-3
    assert out.num_forwards.mean() < 2


def test_medusa_heads_and_blocks_have_their_own_weights():
    """Perturbing one block of one head changes that head's logits only (no shared blocks)."""
    heads = dec.MedusaHeads(3, V, num_blocks=2)
    kernel = jax.random.normal(jax.random.key(16), (8, V))
    params = jax.jit(heads.init_from_lm)(jax.random.key(15), kernel)
    hidden = jax.random.normal(jax.random.key(17), (4, 8))
    logits = jax.jit(heads.logits)
    base = logits(params, hidden)
    for i in range(3):
        for j in range(2):
            name = f"head_{i}_block_{j}"
            bumped = dict(params, **{name: jax.tree.map(lambda x: x + 0.5, params[name])})
            changed = np.any(np.asarray(logits(bumped, hidden) != base), axis=(0, 2))
            np.testing.assert_array_equal(changed, np.arange(3) == i, err_msg=name)
