"""Bad inputs at the public boundaries: each must give a clear error, not a silent wrong answer.

Every case in `CASES` calls one public function the way a new user might get it wrong and
states what must happen: the exception type, and a pattern the message must contain (the name
of the parameter to change). Cases under ``jit`` expect the run-time error of
`feynkit.core.validation.fail_if` (a JaxRuntimeError carrying the ValueError's message).
A case whose correct answer is a value (CosineSchedule.alpha(1) = 0) checks the value.

``python tests/test_bad_input.py`` runs the cases outside pytest and prints the tally
``bad-input tally: <clear errors>/<total>`` (the line CI prints); under pytest each case is
one test, plus hypothesis properties over shapes, dtypes and non-finite placements.

(The resamplers' degenerate weights are tested with core/resampling.py.)
"""

from __future__ import annotations

import json
import re
import struct
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from feynkit.compression.quant.gptq import gptq_quantize
from feynkit.compression.quant.qarray import quantize, quantize_with_params
from feynkit.compression.quant.spqr import spqr_quantize
from feynkit.core.schedules import CosineSchedule, LinearSchedule, RectifiedFlowSchedule
from feynkit.inference import diffusion
from feynkit.inference.smc.fkc import annealed_sde, cfg_sde, fkc_sample, geometric_sde

K = jax.random.key(0)
W = jax.random.normal(K, (16, 8))
X = jax.random.normal(jax.random.key(1), (64, 16))
H = 2 * X.T @ X / 64
H_RANKDEF = jnp.zeros((16, 16)).at[:4, :4].set(1.0)
H_INDEF = jnp.diag(jnp.arange(16.0) - 5)
H_ASYM = H + jnp.triu(jnp.ones((16, 16)), 1)
SCHED = LinearSchedule()
X0 = jax.random.normal(K, (8, 2))
GRID = diffusion.time_grid(6)


def _eps(x, t):
    return 0.1 * x


def _runtime_error():
    return jax.errors.JaxRuntimeError


class Case(NamedTuple):
    name: str
    call: Callable[[], object]
    error: type | Callable[[], type]  # expected exception (or a warning category)
    match: str  # regex the message must contain (the parameter's name)
    warning: bool = False


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def _load_raw(raw: bytes):
    import tempfile

    from feynkit.models.safetensors_io import load_safetensors

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "bad.safetensors"
        p.write_bytes(raw)
        return load_safetensors(p)


_F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _lm_checkpoint(edit: Callable[[dict], dict]):
    import tempfile

    from feynkit.models import TransformerLM, lm_params_to_hf, load_lm_safetensors
    from feynkit.models.safetensors_io import save_safetensors

    model = TransformerLM(vocab_size=11, d_model=8, num_layers=2, num_heads=2, mlp_dim=8, max_len=4)
    shapes = jax.eval_shape(model.init_params, jax.random.key(0))
    hf = lm_params_to_hf(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "m.safetensors"
        save_safetensors(p, edit(hf))
        return load_lm_safetensors(p, model)


def _extra_layer(hf: dict) -> dict:
    extra = {k.replace("layers.1.", "layers.2."): v for k, v in hf.items() if "layers.1." in k}
    return {**hf, **extra}


def _jit_sample_nan():
    run = jax.jit(lambda x: diffusion.sample(K, diffusion.ddim(SCHED), lambda x, t: x * jnp.nan, x, GRID)[0])
    return run(X0).block_until_ready()


def _jit_sample_grid(ts):
    run = jax.jit(lambda ts: diffusion.sample(K, diffusion.euler_maruyama(SCHED), _eps, X0, ts)[0])
    return run(ts).block_until_ready()


def _cosine_alpha_one():
    value = float(CosineSchedule().alpha(1.0))
    if value != 0.0:
        raise AssertionError(f"CosineSchedule().alpha(1.0) = {value}, its docstring says 0")
    return value


CASES: list[Case] = [
    # quantizers: dtype, emptiness, non-finite data (eager and under jit), the GPTQ/SpQR Cholesky
    Case("quantize integer weights", lambda: quantize(jnp.arange(16).reshape(4, 4), 4),
         ValueError, "dtype int32"),
    Case("quantize empty reduction axis", lambda: quantize(jnp.zeros((0, 4)), 4),
         ValueError, "empty"),
    Case("quantize NaN weights", lambda: quantize(W.at[0, 0].set(jnp.nan), 4),
         ValueError, "weights contain NaN"),
    Case("jit(quantize) NaN weights",
         lambda: jax.jit(lambda a: quantize(a, 4).scale)(W.at[0, 0].set(jnp.nan)).block_until_ready(),
         _runtime_error, "weights contain NaN"),
    Case("quantize_with_params zero scale",
         lambda: quantize_with_params(W, jnp.zeros((1, 8)), None, 4), ValueError, "scale"),
    Case("quantize_with_params NaN scale",
         lambda: quantize_with_params(W, jnp.full((1, 8), jnp.nan), None, 4), ValueError, "scale"),
    Case("quantize_with_params integer scale",
         lambda: quantize_with_params(W, jnp.ones((1, 8), jnp.int32), None, 4), ValueError, "scale"),
    Case("gptq rank-deficient H, percdamp=0", lambda: gptq_quantize(W, H_RANKDEF, 4, percdamp=0.0),
         ValueError, "percdamp"),
    Case("gptq indefinite H", lambda: gptq_quantize(W, H_INDEF, 4, percdamp=0.0), ValueError,
         "positive definite"),
    Case("gptq asymmetric H", lambda: gptq_quantize(W, H_ASYM, 4), ValueError, "symmetri"),
    Case("jit(gptq) non-PD H",
         lambda: jax.jit(lambda h: gptq_quantize(W, h, 4, percdamp=0.0).scale)(H_INDEF).block_until_ready(),
         _runtime_error, "percdamp"),
    Case("gptq NaN H", lambda: gptq_quantize(W, H.at[0, 1].set(jnp.nan), 4), ValueError,
         "H contains NaN"),
    Case("gptq integer weights", lambda: gptq_quantize(jnp.ones((16, 8), jnp.int32), H, 4),
         ValueError, "dtype int32"),
    Case("gptq empty kernel", lambda: gptq_quantize(jnp.zeros((0, 8)), jnp.zeros((0, 0)), 4),
         ValueError, "empty"),
    Case("spqr non-PD H", lambda: spqr_quantize(W, H_INDEF, 3, percdamp=0.0), ValueError,
         "percdamp"),
    Case("spqr NaN weights", lambda: spqr_quantize(W.at[1, 1].set(jnp.nan), H, 3), ValueError,
         "w contains NaN"),
    Case("spqr NaN H", lambda: spqr_quantize(W, H.at[2, 2].set(jnp.inf), 3), ValueError,
         "H contains NaN"),
    Case("spqr integer weights", lambda: spqr_quantize(jnp.ones((16, 8), jnp.int8), H, 3),
         ValueError, "dtype int8"),
    # schedules and SDE constructors
    Case("LinearSchedule.beta(-0.5)", lambda: SCHED.beta(-0.5), ValueError, r"t=\[-0.5\]"),
    Case("LinearSchedule.alpha(1.5)", lambda: SCHED.alpha(1.5), ValueError, "outside"),
    Case("RectifiedFlowSchedule.sigma(NaN)", lambda: RectifiedFlowSchedule().sigma(jnp.nan),
         ValueError, "domain"),
    Case("LinearSchedule(beta_max=inf)", lambda: LinearSchedule(beta_max=float("inf")),
         ValueError, "beta_max"),
    Case("CosineSchedule(s=nan)", lambda: CosineSchedule(s=float("nan")), ValueError, "s > 0"),
    Case("CosineSchedule.alpha(1.0) is 0", _cosine_alpha_one, None, ""),
    Case("annealed_sde(beta=inf)", lambda: annealed_sde(_eps, SCHED, float("inf")), ValueError,
         "beta"),
    Case("cfg_sde(w=nan)", lambda: cfg_sde(_eps, _eps, SCHED, float("nan")), ValueError,
         "guidance_weight"),
    Case("geometric_sde inf exponent", lambda: geometric_sde([_eps], [float("inf")], SCHED),
         ValueError, "exponents"),
    Case("fkc_sample num_steps=3", lambda: fkc_sample(K, annealed_sde(_eps, SCHED, 2.0), 16, 2, 3),
         RuntimeWarning, "num_steps=3", warning=True),
    # guidance constructors
    Case("cfg(nan)", lambda: diffusion.cfg(float("nan")), ValueError, "scale"),
    Case("cfg(inf)", lambda: diffusion.cfg(float("inf")), ValueError, "scale"),
    Case("apg(eta=nan)", lambda: diffusion.apg(2.0, float("nan"), schedule=SCHED), ValueError,
         "eta"),
    # the sampling loop
    # (an increasing grid under a deterministic solver is an inversion, e.g. DDIM inversion)
    Case("sample increasing grid (Euler-Maruyama)",
         lambda: diffusion.sample(K, diffusion.euler_maruyama(SCHED), _eps, X0, GRID[::-1]),
         ValueError, "timesteps must decrease"),
    Case("sample increasing grid (DDPM)",
         lambda: diffusion.sample(K, diffusion.ddpm(SCHED), _eps, X0, GRID[::-1]),
         ValueError, "timesteps must decrease"),
    Case("sample non-monotonic grid (DDIM)",
         lambda: diffusion.sample(K, diffusion.ddim(SCHED), _eps, X0, jnp.array([1.0, 0.5, 0.7, 0.1])),
         ValueError, "strictly monotonic"),
    Case("sample non-monotonic grid (DPM-Solver++)",
         lambda: diffusion.sample(K, diffusion.dpm_solver_pp_2m(SCHED), _eps, X0, jnp.array([0.9, 0.9, 0.1])),
         ValueError, "strictly monotonic"),
    Case("sample grid outside [0, 1]",
         lambda: diffusion.sample(K, diffusion.ddim(SCHED), _eps, X0, jnp.linspace(2.0, -1.0, 7)),
         ValueError, "timesteps must lie"),
    Case("jit(sample) increasing grid", lambda: _jit_sample_grid(GRID[::-1]), _runtime_error,
         "timesteps must decrease"),
    Case("sample model output (n, 1)",
         lambda: diffusion.sample(K, diffusion.ddim(SCHED), lambda x, t: x[:, :1], X0, GRID),
         ValueError, "model_fn returned an output of shape"),
    Case("sample model output scalar",
         lambda: diffusion.sample(K, diffusion.ddim(SCHED), lambda x, t: jnp.sum(x), X0, GRID),
         ValueError, "model_fn returned an output of shape"),
    Case("sample model returns NaN",
         lambda: diffusion.sample(K, diffusion.ddim(SCHED), lambda x, t: x * jnp.nan, X0, GRID),
         ValueError, "model_fn"),
    Case("jit(sample) model returns NaN", _jit_sample_nan, _runtime_error, "NaN or Inf at step 0"),
    # safetensors
    Case("safetensors overlapping data_offsets",
         lambda: _load_raw(_raw_safetensors({"a": _F32_2, "b": _F32_2}, b"\0" * 8)), ValueError,
         "offset"),
    Case("safetensors trailing bytes",
         lambda: _load_raw(_raw_safetensors({"a": _F32_2}, b"\0" * 12)), ValueError,
         "not fully covered"),
    Case("safetensors non-string metadata",
         lambda: _load_raw(_raw_safetensors({"__metadata__": {"x": 1}, "a": _F32_2}, b"\0" * 8)),
         ValueError, "header"),
    Case("safetensors header length 2^40",
         lambda: _load_raw(struct.pack("<Q", 2**40) + b"{}"), ValueError, "header too large"),
    Case("safetensors missing tensor",
         lambda: _lm_checkpoint(lambda hf: {k: v for k, v in hf.items() if "layers.1.mlp.up" not in k}),
         ValueError, r"lacks 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"),
    Case("safetensors extra tensor", lambda: _lm_checkpoint(_extra_layer), ValueError,
         r"model does not have.*model\.layers\.2\."),
]


def run_case(case: Case) -> tuple[bool, str]:
    """(clear, what happened): the expected error type with the parameter in its message."""
    expected = case.error() if callable(case.error) and not isinstance(case.error, type) else case.error
    if case.warning:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            case.call()
        hits = [w for w in caught if issubclass(w.category, expected)]
        ok = any(re.search(case.match, str(w.message)) for w in hits)
        return ok, str(hits[0].message) if hits else "no warning"
    try:
        out = case.call()
        jax.block_until_ready(out)
    except Exception as e:  # noqa: BLE001 - classifying is the point
        if expected is None:
            return False, f"{type(e).__name__}: {e}"
        ok = isinstance(e, expected) and re.search(case.match, str(e)) is not None
        return ok, f"{type(e).__name__}: {str(e)[:160]}"
    return expected is None, "returned a value"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_a_clear_error(case):
    import logging

    logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)  # callback tracebacks
    ok, what = run_case(case)
    assert ok, f"{case.name}: {what}"


# Properties over shapes, dtypes and where the non-finite value sits.
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_shapes = st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple)


@settings(max_examples=12, deadline=None)
@given(shape=_shapes, dtype=st.sampled_from([np.int8, np.int32, np.uint8, np.bool_]))
def test_quantize_refuses_every_integer_dtype(shape, dtype):
    with pytest.raises(ValueError, match="floating-point weights"):
        quantize(np.zeros(shape, dtype), 4, axis=0)


@settings(max_examples=12, deadline=None)
@given(shape=_shapes, data=st.data(), bad=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_quantize_refuses_a_non_finite_weight_anywhere(shape, data, bad):
    w = np.ones(shape, np.float32)
    idx = tuple(data.draw(st.integers(0, n - 1)) for n in shape)
    w[idx] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize(w, 4, axis=0)


@settings(max_examples=12, deadline=None)
@given(t=st.one_of(st.floats(max_value=-1e-6), st.floats(min_value=1.000001), st.just(np.nan)))
def test_schedules_refuse_times_outside_the_domain(t):
    for sched in (LinearSchedule(), CosineSchedule(), RectifiedFlowSchedule()):
        with pytest.raises(ValueError, match="outside the schedule's time domain"):
            sched.sigma(t)


def test_traced_out_of_domain_time_is_nan_not_an_extrapolation():
    beta = jax.jit(SCHED.beta)
    assert np.isnan(float(beta(-0.5))) and np.isclose(float(beta(0.5)), 0.1 + 0.5 * 19.9)


def tally() -> tuple[int, int]:
    import logging

    logging.getLogger("jax._src.debugging").setLevel(logging.CRITICAL)
    clear = 0
    for case in CASES:
        ok, what = run_case(case)
        clear += ok
        if not ok:
            print(f"  not clear: {case.name}: {what}")
    return clear, len(CASES)


if __name__ == "__main__":
    clear, total = tally()
    print(f"bad-input tally: {clear}/{total} clear errors")
    sys.exit(0 if clear == total else 1)
