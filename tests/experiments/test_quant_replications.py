"""Smoke runs of the quantization replications through the Hydra config and `run_experiment`."""

import numpy as np
import pytest

from tests.experiments.smoke import smoke_run


def _smoke(name, tmp_path, monkeypatch):
    """The shared smoke check; returns the metrics."""
    return smoke_run(name, tmp_path / "run")["metrics"]


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
