"""`task=compress` with the prune group: composition (a pruner makes quant default to none),
combination checks, and the commands end to end on the smoke byte LM (slow)."""

import pytest
from hydra import compose, initialize_config_dir


def _compose(*overrides):
    from feynkit.experiments.run import register_configs
    from feynkit.experiments.tasks.schemas import config_dir

    register_configs()
    with initialize_config_dir(str(config_dir()), version_base=None):
        return compose("config", overrides=list(overrides))


def test_prune_group_composes_with_and_without_quant():
    cfg = _compose("task=compress", "prune=sparsegpt", "prune.sparsity=0.6")
    assert cfg.quant._target_ is None and cfg.prune.sparsity == 0.6
    cfg = _compose("task=compress", "prune=wanda", "prune.n=2", "prune.m=4", "quant=gptq")
    assert cfg.quant._target_.endswith("gptq_recipe") and cfg.prune.n == 2
    assert _compose("task=compress").prune._target_ is None  # default: no pruning


def test_unknown_prune_key_and_empty_compress_are_rejected():
    from feynkit.experiments.tasks.validate import validate_combination

    with pytest.raises(Exception, match="Could not override .prune.foo"):
        _compose("task=compress", "prune=magnitude", "prune.foo=1")
    with pytest.raises(ValueError, match="needs a quantizer or a pruner"):
        validate_combination(_compose("task=compress", "quant=none"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("prune=sparsegpt", "prune.sparsity=0.5"),
        ("prune=wanda", "prune.n=2", "prune.m=4"),
        ("prune=obert",),
        ("prune=sparsegpt", "prune.bits=4"),
        ("prune=magnitude", "quant=rtn"),
    ],
)
def test_compress_byte_lm_prune_commands(tmp_path, overrides):
    from tests.experiments.test_tasks import run_task

    res = run_task(tmp_path, "task=compress", "model=byte_lm", *overrides)
    m = res["metrics"]
    assert m["sparsity.mask"] == pytest.approx(0.5, abs=0.01)
    assert m["sparsity.zeros"] >= m["sparsity.mask"] - (0.5 if "quant=rtn" in overrides else 0)
    assert m["layers_compressed"] == 7


# ---------------------------------------------------------------------------------------------
# prune=flap|evopress|wina|dare (experiments/tasks/prune_options.py)
# ---------------------------------------------------------------------------------------------

NEW_OPTIONS = {
    "flap": ("prune.sparsity=0.3", "prune.structure=UL-UM", "prune.bias_compensation=false"),
    "evopress": ("prune.base=magnitude", "prune.generations=2", "prune.stage_windows=[2,4]"),
    "wina": ("prune.sparsity=0.65", "prune.modules=.*mlp/down_proj"),
    "dare": ("prune.sparsity=0.8", "prune.rescale=false", "prune.subset=gui"),
}


@pytest.mark.parametrize("option", sorted(NEW_OPTIONS))
def test_new_prune_options_compose_and_reject_bad_keys(option):
    from feynkit.experiments.tasks import prune_options as po
    from feynkit.experiments.tasks.build import _instantiate
    from feynkit.experiments.tasks.validate import validate_combination

    cfg = _compose("task=compress", "model=byte_lm", f"prune={option}", *NEW_OPTIONS[option])
    assert cfg.quant._target_ is None  # a pruner makes quant default to none
    validate_combination(cfg)
    spec = _instantiate(cfg.prune)
    assert isinstance(spec, po.SPECS)
    for override in NEW_OPTIONS[option]:  # every override reached the spec
        key, value = override.removeprefix("prune.").split("=")
        got = getattr(spec, key)
        got = list(got) if isinstance(got, tuple) else got
        assert str(got).lower().replace(" ", "") == value.lower().replace(" ", "")
    with pytest.raises(Exception, match="Could not override .prune.foo|valid keys"):
        _compose("task=compress", f"prune={option}", "prune.foo=1")


def test_new_prune_options_reject_bad_combinations_and_values():
    from feynkit.experiments.tasks.build import _instantiate
    from feynkit.experiments.tasks.validate import validate_combination

    for option in ("flap", "evopress", "dare"):
        with pytest.raises(ValueError, match=f"prune={option} needs model=byte_lm"):
            validate_combination(_compose("task=compress", "model=toy_mlp", f"prune={option}"))
    for option in ("wina", "dare"):
        with pytest.raises(ValueError, match="use quant=none"):
            validate_combination(_compose("task=compress", f"prune={option}", "quant=rtn"))
    with pytest.raises(ValueError, match="stage_windows"):
        validate_combination(
            _compose("task=compress", "prune=evopress", "prune.calibration.num_samples=8")
        )
    bad = [
        ("flap", "prune.structure=AL-UM", "structure"),
        ("flap", "prune.sparsity=1.0", "prune.sparsity"),
        ("evopress", "prune.sparsity=0.55", "one of prune.levels"),
        ("evopress", "prune.base=obert", "prune.base"),
        ("wina", "prune.sparsity=-0.1", "prune.sparsity"),
        ("dare", "prune.subset=web", "prune.subset"),
        ("dare", "prune.q=0.05", "prune.q"),
    ]
    for option, override, message in bad:
        with pytest.raises(ValueError, match=message):
            _instantiate(_compose("task=compress", f"prune={option}", override).prune)


def _smoke_lm_dims():
    from feynkit.experiments import zoo

    ex = zoo.model_config(zoo.LMConfig, None, smoke=True)
    return ex.d_model, ex.num_heads, ex.d_model // ex.num_heads, ex.mlp_dim, ex.num_layers


@pytest.mark.slow
@pytest.mark.parametrize("bias", [True, False])
def test_compress_flap_shrinks_the_arrays(tmp_path, bias):
    """The shrunk model's parameter count is exactly what the kept heads and channels leave
    (q/o: heads·hd·d each, k/v likewise without grouped queries, gate/up/down: 3·d per channel,
    plus the two d-wide compensation biases per layer); perplexity finite and within 1.3x."""
    from tests.experiments.test_tasks import run_task

    res = run_task(
        tmp_path,
        "task=compress",
        "model=byte_lm",
        "prune=flap",
        "prune.sparsity=0.4",
        f"prune.bias_compensation={str(bias).lower()}",
    )
    m = res["metrics"]
    d, h, hd, mlp, layers = _smoke_lm_dims()
    removed = 0
    for i in range(layers):
        heads, channels = m[f"heads_kept.layers_{i}"], m[f"channels_kept.layers_{i}"]
        assert 1 <= heads <= h and 1 <= channels < mlp
        removed += 4 * (h - heads) * hd * d + 3 * (mlp - channels) * d - (2 * d if bias else 0)
    assert m["params.float"] - m["params.pruned"] == removed
    assert m["params_ratio"] < 1 and m["bytes.compressed"] == 4 * m["params.pruned"]
    assert m["removed_fraction"] == pytest.approx(0.4, abs=0.05)
    assert m["perplexity_ratio"] < 1.3
    assert 0 < m["layer_error.max"] <= 1  # zeroed structure at full shape


@pytest.mark.slow
def test_compress_evopress_keeps_the_average_sparsity(tmp_path):
    from tests.experiments.test_tasks import run_task

    res = run_task(tmp_path, "task=compress", "model=byte_lm", "prune=evopress")
    m = res["metrics"]
    alloc = [v for k, v in m.items() if k.startswith("evopress.sparsity.")]
    assert len(alloc) == m["layers_compressed"] == 7
    levels = [0.1 * i for i in range(10)]
    assert all(min(abs(a - v) for v in levels) < 1e-9 for a in alloc)
    # the smoke LM's seven kernels are two size groups of equal sizes: weights d·d (q, k, v, o)
    # and d·mlp (gate, up, down), so the allocation's average is the plain mean per group
    q, k, v, o = (m[f"evopress.sparsity.layers_0/self_attn/{p}_proj/kernel"] for p in "qkvo")
    g, u, dn = (
        m[f"evopress.sparsity.layers_0/mlp/{p}_proj/kernel"] for p in ("gate", "up", "down")
    )
    assert (q + k + v + o) / 4 == pytest.approx(0.6, abs=1e-9)
    assert (g + u + dn) / 3 == pytest.approx(0.6, abs=1e-9)
    assert m["evopress.searched_calib_kl"] <= m["evopress.uniform_calib_kl"]
    assert m["sparsity.mask"] == pytest.approx(0.6, abs=0.01)
    assert m["perplexity_ratio"] < 1.5


@pytest.mark.slow
def test_compress_wina_gates_the_requested_fraction(tmp_path):
    from tests.experiments.test_tasks import run_task

    res = run_task(tmp_path, "task=compress", "model=byte_lm", "prune=wina", "prune.sparsity=0.5")
    m = res["metrics"]
    assert m["activation_sparsity.wina"] == pytest.approx(0.5, abs=1e-6)
    assert m["activation_sparsity.magnitude"] == pytest.approx(0.5, abs=1e-6)
    assert m["gated_layers.wina"] == m["gated_layers.magnitude"] == 7
    assert m["perplexity.wina"] != m["perplexity.magnitude"]  # the two gates differ
    assert 0 < m["output_error.wina"] < 1 and 0 < m["output_error.magnitude"] < 1
    assert m["perplexity_ratio.wina"] < 1.5


@pytest.mark.slow
def test_compress_dare_keeps_the_finetune(tmp_path):
    from tests.experiments.test_tasks import run_task

    res = run_task(tmp_path, "task=compress", "model=byte_lm", "prune=dare")
    m = res["metrics"]
    assert m["sparsity.delta"] == pytest.approx(0.9, abs=0.01)
    assert m["perplexity.finetuned"] < m["perplexity.base"]  # the fine-tune learnt the subset
    assert m["perplexity_ratio"] < 1.1  # DARE'd within 10% of the fine-tune's perplexity
