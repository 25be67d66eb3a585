"""Smoke runs of the quantization replications through the Hydra config and `run_experiment`."""

import json
from pathlib import Path

import numpy as np
import pytest

import feynkit
from feynkit.experiments import train as tr


def _smoke(name, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from feynkit.experiments.run import register_configs, run_experiment

    monkeypatch.setenv(tr.CACHE_ENV, str(tmp_path / "cache"))
    register_configs()
    config_dir = Path(feynkit.__file__).parent / "configs"
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose("config", overrides=[f"experiment={name}", "smoke=true"])
    res = run_experiment(cfg, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["experiment"] == name and written["config"]["smoke"] is True
    assert all(np.isfinite(v) for v in written["metrics"].values())
    assert written["claims"] and res.figures
    assert all((tmp_path / "run" / f).is_file() for f in res.figures)
    return written["metrics"]


@pytest.mark.slow
def test_quant_ppl_smoke(tmp_path, monkeypatch):
    m = _smoke("quant_ppl", tmp_path, monkeypatch)
    for name in ("rtn4", "gptq4", "spqr3", "vptq", "gptq3+eora"):
        assert m[f"{name}.ppl"] > 1 and m[f"{name}.bits"] > 1
    assert m["rtn4.layer_error"] < m["rtn2.layer_error"]
    assert m["gptq3+eora.layer_error"] < m["gptq3.layer_error"]


@pytest.mark.slow
def test_svdquant_w4a4_smoke(tmp_path, monkeypatch):
    m = _smoke("svdquant_w4a4", tmp_path, monkeypatch)
    assert m["svdquant.layer_error"] < m["plain.layer_error"]
    assert m["float_injected.ppl"] == pytest.approx(m["float.ppl"], rel=1e-3)


def test_outlier_injection_preserves_the_function():
    import jax
    import jax.numpy as jnp

    from feynkit.experiments.replications.svdquant_w4a4 import inject_outliers
    from feynkit.models import TransformerLM

    model = TransformerLM(256, 32, 1, 2, mlp_dim=48, max_len=16)
    params = model.init_params(jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 256)
    new = inject_outliers(params, 0, 3, 30.0)
    forward = jax.jit(model.forward)
    np.testing.assert_allclose(forward(new, tokens), forward(params, tokens), rtol=1e-4, atol=1e-4)
    ratio = (
        new["layers_0"]["input_layernorm"]["scale"] / params["layers_0"]["input_layernorm"]["scale"]
    )
    assert int(jnp.sum(jnp.isclose(ratio, 30.0))) == 3
