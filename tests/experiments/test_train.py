"""Tests for feynkit.experiments.train and the training experiments' smoke runs."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import feynkit
from feynkit.core import particle_mesh
from feynkit.experiments import train as tr
from feynkit.experiments.data import gaussian_mixture_2d
from feynkit.models import VAE, ImageClassifier, ScoreMLP, TransformerLM, UNet

BATCH = 32


def _toy_setup(key=None):
    key = jax.random.key(0) if key is None else key
    model = ScoreMLP(hidden=32, num_layers=1, num_classes=8, time_features=16)
    params = model.init_params(jax.random.key(1), 2)
    data = gaussian_mixture_2d(key, 512)
    loss_fn = tr.denoising_score_loss(model.forward, num_classes=8)
    return model, params, data, loss_fn


def _fixed_loss(loss_fn, params, data):
    keys = jax.random.split(jax.random.key(7), 8)
    return float(jax.jit(jax.vmap(lambda k: loss_fn(params, data, k)))(keys).mean())


def _run(tmp_dir, num_steps, params, loss_fn, data, **kw):
    opt = optax.adam(3e-3)
    return tr.train(
        loss_fn,
        opt,
        params,
        tr.array_batch_fn(BATCH),
        jax.random.key(3),
        num_steps,
        data=data,
        checkpoint_dir=tmp_dir,
        progress=False,
        **kw,
    )


def _assert_trees_close(a, b, **kw):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kw), a, b)


def _counting(loss_fn):
    traces = []

    def counted(params, batch, key):
        traces.append(1)  # runs once per trace, not per step
        return loss_fn(params, batch, key)

    return counted, traces


def test_training_reduces_loss():
    _, params, data, loss_fn = _toy_setup()
    before = _fixed_loss(loss_fn, params, data)
    counted, traces = _counting(loss_fn)
    state, history = _run(None, 200, params, counted, data, log_every=50, steps_per_call=50)
    assert len(traces) == 1  # the fused 50-step chunk compiled once for all four calls
    after = _fixed_loss(loss_fn, state.params, data)
    assert int(state.step) == 200
    assert [s for s, *_ in history] == [50, 100, 150, 200]
    assert after < 0.8 * before
    assert history[-1][1] < history[0][1]


def test_resume_equals_uninterrupted(tmp_path):
    _, params, data, loss_fn = _toy_setup()
    full, full_history = _run(
        tmp_path / "full", 10, params, loss_fn, data, checkpoint_every=3, log_every=2
    )
    part, _ = _run(tmp_path / "run", 6, params, loss_fn, data, checkpoint_every=3, log_every=2)
    assert int(part.step) == 6
    # A history file one chunk ahead of the checkpoints (as a kill between the two leaves it)
    # must not add entries past the restored step.
    hist_file = tmp_path / "run" / "history.json"
    hist_file.write_text(hist_file.read_text()[:-1] + ", [99, 1.0, 1.0]]")
    resumed, history = _run(
        tmp_path / "run", 10, params, loss_fn, data, checkpoint_every=3, log_every=2
    )
    # the whole run's history: the first run's entries (steps ≤ 6), then this run's
    assert [s for s, *_ in history] == [s for s, *_ in full_history] == [2, 3, 5, 6, 8, 9, 10]
    np.testing.assert_allclose([h[1] for h in history], [h[1] for h in full_history], rtol=1e-6)
    assert all(b[2] >= a[2] for a, b in zip(history, history[1:], strict=False))
    assert int(resumed.step) == 10
    _assert_trees_close(resumed.params, full.params, rtol=1e-6, atol=1e-7)
    _assert_trees_close(resumed.opt_state, full.opt_state, rtol=1e-6, atol=1e-7)


def test_data_parallel_step_equals_single_device():
    assert jax.device_count() == 2  # tests/conftest.py
    _, params, data, loss_fn = _toy_setup()
    opt = optax.adam(1e-2)
    batch = jax.tree.map(lambda a: a[:BATCH], data)
    outs = []
    for devices in (jax.devices()[:1], jax.devices()):
        counted, traces = _counting(loss_fn)
        step = tr.make_train_step(counted, opt, particle_mesh(devices))
        p, o = params, opt.init(params)
        for i in range(3):
            p, o, loss = step(p, o, batch, jax.random.key(i))
        assert len(traces) == 1  # compiled once
        assert p["output"]["kernel"].sharding.is_fully_replicated
        outs.append((jax.device_get(p), float(loss)))
    _assert_trees_close(outs[0][0], outs[1][0], rtol=1e-4, atol=1e-5)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-5)


def test_bad_batch_size_raises():
    _, params, data, loss_fn = _toy_setup()
    opt = optax.adam(1e-3)
    step = tr.make_train_step(loss_fn, opt)
    odd = jax.tree.map(lambda a: a[:7], data)
    with pytest.raises(ValueError, match="batch size does not divide over the device mesh"):
        step(params, opt.init(params), odd, jax.random.key(0))
    with pytest.raises(ValueError, match="7 particles do not divide over 2 devices"):
        tr.train(loss_fn, opt, params, tr.array_batch_fn(7), jax.random.key(0), 5, data=data)


def test_cache_hit_returns_same_params_without_training(tmp_path, monkeypatch):
    monkeypatch.setenv(tr.CACHE_ENV, str(tmp_path / "env_cache"))
    assert tr.cache_dir() == tmp_path / "env_cache"
    assert tr.cache_dir(tmp_path / "cfg") == tmp_path / "cfg"
    _, params, data, loss_fn = _toy_setup()
    calls = []

    def train_fn(ckpt_dir):
        calls.append(ckpt_dir)
        state, history = _run(ckpt_dir, 20, params, loss_fn, data, log_every=10)
        return state.params, {"final_loss": history[-1][1]}

    cfg = {"name": "toy", "hidden": 32, "steps": 20}
    first = tr.cached_train(cfg, train_fn)
    second = tr.cached_train(dict(reversed(list(cfg.items()))), train_fn)  # key order irrelevant
    assert len(calls) == 1 and not first.hit and second.hit
    assert first.path == second.path and first.path.parent == tmp_path / "env_cache"
    assert not (first.path / "training").exists()
    assert second.info == first.info and "final_loss" in second.info
    _assert_trees_close(first.params, second.params, rtol=0, atol=0)
    typed = tr.cached_train(cfg, train_fn, like=params)
    assert typed.hit and len(calls) == 1
    assert jax.tree.structure(typed.params) == jax.tree.structure(params)
    assert json.loads((first.path / "config.json").read_text()) == cfg

    # Any change in the defining config is another entry.
    assert tr.config_hash(cfg) != tr.config_hash({**cfg, "steps": 21})
    assert tr.config_hash(cfg) != tr.config_hash({**cfg, "seed": 0})
    assert tr.config_hash(cfg) == tr.config_hash(dict(cfg))
    other = tr.cached_train({**cfg, "steps": 21}, train_fn, directory=tmp_path / "cfg")
    assert not other.hit and len(calls) == 2 and other.path.parent == tmp_path / "cfg"


def test_cache_dir_default(monkeypatch):
    monkeypatch.delenv(tr.CACHE_ENV, raising=False)
    assert str(tr.cache_dir()).endswith(".cache/feynkit")


# The UNet case compiles for ~30 s on a loaded 2-core CPU (a threefry per parameter shape).
@pytest.mark.parametrize(
    "kind", [pytest.param("unet", marks=pytest.mark.slow), "classifier", "vae", "lm"]
)
def test_losses_are_finite_scalars_with_gradients(kind):
    key = jax.random.key(0)
    if kind == "lm":
        model = TransformerLM(vocab_size=256, d_model=32, num_layers=1, num_heads=2, mlp_dim=64)
        params = model.init_params(key)
        toks = jax.random.randint(key, (4, 17), 0, 256)
        loss_fn, batch = tr.next_token_loss(model.forward), (toks[:, :-1], toks[:, 1:])
    else:
        x = jax.random.uniform(key, (4, 8, 8, 1), minval=-1.0, maxval=1.0)
        y = jnp.arange(4) % 10
        if kind == "unet":
            model = UNet(channels=8, num_classes=10, time_features=16)
            params = model.init_params(key)
            loss_fn = tr.denoising_score_loss(model.forward, num_classes=10)
        elif kind == "classifier":
            model = ImageClassifier(num_classes=10, channels=8, time_features=16)
            params = model.init_params(key)
            loss_fn = tr.noisy_classifier_loss(model.forward, clean_fraction=0.5)
        else:
            model = VAE(data_shape=(8, 8, 1), latent_dim=4, hidden=[32])
            params = model.init_params(key)
            loss_fn, x = tr.negative_elbo_loss(model), (x > 0).astype(jnp.float32)
        batch = (x, y)
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, batch, jax.random.key(1))
    assert loss.shape == () and jnp.isfinite(loss)
    assert all(jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads))
    assert any(jnp.any(g != 0) for g in jax.tree.leaves(grads))


# --------------------------------------------------------------------------------------------
# Smoke runs of the training experiments through the Hydra entry point
# --------------------------------------------------------------------------------------------


def _smoke_config(name):
    from hydra import compose, initialize_config_dir

    from feynkit.experiments.run import register_configs

    register_configs()
    config_dir = Path(feynkit.__file__).parent / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        return compose("config", overrides=[f"experiment={name}", "smoke=true"])


def _smoke_run(name, tmp_path, monkeypatch, runs=1):
    from feynkit.experiments.run import run_experiment

    monkeypatch.setenv(tr.CACHE_ENV, str(tmp_path / "cache"))
    cfg = _smoke_config(name)
    results = []
    for i in range(runs):
        out = tmp_path / f"run{i}"
        res = run_experiment(cfg, out)
        written = json.loads((out / "results.json").read_text())
        assert written["experiment"] == name and written["config"]["smoke"] is True
        assert written["metrics"]["cache_hit"] == float(i > 0)
        assert all(np.isfinite(v) for v in written["metrics"].values())
        assert written["claims"] and all(c["holds"] for c in written["claims"])
        assert res.figures and all((out / f).is_file() for f in res.figures)
        assert any((out / "checkpoints").iterdir())
        results.append(written["metrics"])
    assert len(list((tmp_path / "cache").iterdir())) >= 1
    return results


def test_train_toy_smoke_trains_then_hits_cache(tmp_path, monkeypatch):
    first, second = _smoke_run("train_toy", tmp_path, monkeypatch, runs=2)
    assert "train_seconds" in first and second["train_seconds"] == first["train_seconds"]
    # The cached model samples exactly like the freshly trained one.
    assert second["energy_distance.conditional"] == pytest.approx(
        first["energy_distance.conditional"], rel=1e-5
    )


def test_train_vae_smoke(tmp_path, monkeypatch):
    (metrics,) = _smoke_run("train_vae", tmp_path, monkeypatch)
    assert metrics["test_elbo"] < 0 and metrics["test_kl"] > 0


def test_train_lm_smoke(tmp_path, monkeypatch):
    (metrics,) = _smoke_run("train_lm", tmp_path, monkeypatch)
    assert metrics["validation_perplexity"] < 256
    assert (tmp_path / "run0" / "sample.txt").read_text().startswith("def ")


@pytest.mark.slow
def test_train_digits_smoke(tmp_path, monkeypatch):
    (metrics,) = _smoke_run("train_digits", tmp_path, monkeypatch)
    assert 0.0 <= metrics["class_accuracy"] <= 1.0 and metrics["fd_digits"] >= 0
