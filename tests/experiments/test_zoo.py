"""The model zoo: loaders train once, then return the cached parameters; any config carrying a
loader's fields maps to the same cache entry."""

import dataclasses

import jax
import numpy as np
import pytest

from feynkit.experiments import train as tr
from feynkit.experiments import zoo


def _same_params(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(tr.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_trained_toy_model_trains_then_hits_cache(fresh_cache):
    model, first = zoo.trained_toy_model(smoke=True)
    _, second = zoo.trained_toy_model(smoke=True)
    assert not first.hit and second.hit and first.path == second.path
    assert first.path.parent == fresh_cache
    assert _same_params(first.params, second.params)
    assert second.info["train_seconds"] == first.info["train_seconds"]
    x = np.zeros((3, 2), np.float32)
    assert model.forward(second.params, x, np.full((3,), 0.5, np.float32), None).shape == (3, 2)


def test_replication_config_shares_the_zoo_entry(fresh_cache):
    @dataclasses.dataclass
    class WithEvaluation(zoo.ToyModelConfig):
        num_samples: int = 7  # evaluation fields are not part of the key

    _, first = zoo.trained_toy_model(smoke=True)
    _, again = zoo.trained_toy_model(WithEvaluation(), smoke=True)
    assert again.hit and again.path == first.path
    other = zoo.model_config(zoo.ToyModelConfig, WithEvaluation(steps=7), smoke=True)
    assert other.steps == zoo.TOY_SMOKE["steps"]  # the smoke settings win
    changed = dataclasses.replace(other, hidden=other.hidden + 1)
    assert tr.config_hash(zoo._toy_defining_config(changed, 0)) != first.path.name.split("-")[-1]


@pytest.mark.parametrize(
    "name, model_cls",
    [
        ("train_toy", zoo.ToyModelConfig),
        ("train_digits", zoo.DigitsModelsConfig),
        ("train_lm", zoo.LMConfig),
        ("train_vae", zoo.VAEModelConfig),
    ],
)
def test_training_replications_train_the_models_the_zoo_serves(name, model_cls):
    """The model keys of configs/experiment/train_*.yaml equal the zoo's defaults, so a full
    training run fills the cache entry every other replication loads."""
    from feynkit.experiments import harness

    from .smoke import smoke_config

    cfg = smoke_config(name)
    cfg.smoke = False
    ex = harness.experiment_node(cfg, harness.get(name).schema)
    assert zoo.model_config(model_cls, ex) == model_cls()


def test_trained_lm_and_load_lm_hit_cache(fresh_cache):
    model, first = zoo.trained_lm(smoke=True)
    assert not first.hit
    m2, params, corpus, lm_ex = zoo.load_lm(type("Ex", (), {"cache_dir": None, "lm_smoke": True})())
    assert lm_ex.seq_len == zoo.LM_SMOKE["seq_len"] and len(corpus.validation) > lm_ex.seq_len
    assert _same_params(first.params, params)
    _, second = zoo.trained_lm(lm_ex, 0, corpus)
    assert second.hit and second.path == first.path
    assert model.forward(params, np.zeros((1, 4), np.int32)).shape == (1, 4, 256)


def test_trained_vae_hits_cache(fresh_cache):
    _, first = zoo.trained_vae(smoke=True)
    model, second = zoo.trained_vae(smoke=True)
    assert not first.hit and second.hit and _same_params(first.params, second.params)
    assert model.latent_dim == zoo.VAEModelConfig().latent_dim


@pytest.mark.slow
def test_trained_digits_models_hit_cache_and_judge(fresh_cache):
    (unet, classifier), first = zoo.trained_digits_models(smoke=True)
    _, second = zoo.trained_digits_models(smoke=True)
    assert set(first) == {"unet", "classifier"}
    assert all(not c.hit for c in first.values()) and all(c.hit for c in second.values())
    judge = zoo.digits_judge(classifier, second["classifier"].params)
    feats, logits = judge(np.zeros((4, 8, 8, 1), np.float32))
    assert feats.shape[0] == 4 and logits.shape == (4, zoo.DIGITS_NUM_CLASSES)


def test_model_config_reads_fields_and_names_missing_ones():
    @dataclasses.dataclass
    class Wider(zoo.ToyModelConfig):
        num_samples: int = 7

    cfg = zoo.model_config(zoo.ToyModelConfig, Wider(hidden=32))
    assert type(cfg) is zoo.ToyModelConfig and cfg.hidden == 32
    assert zoo.model_config(zoo.ToyModelConfig, None) == zoo.ToyModelConfig()
    with pytest.raises(ValueError, match="hidden"):
        zoo.model_config(zoo.ToyModelConfig, type("Partial", (), {"cache_dir": None})())
