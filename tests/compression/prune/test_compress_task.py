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
