"""The generic tasks end to end (smoke sizes): compose `task=<name>` with group overrides through
Hydra's compose API, run through the entry point's `run_experiment`, check results.json.

Analytic mixtures have exact targets, so the claims checked here are real bounds: the energy
distance of FKC-corrected, guided or steered samples to exact draws of the intended target.
"""

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from feynkit.experiments.tasks.schemas import config_dir


def task_config(*overrides: str):
    from feynkit.experiments.run import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose("config", overrides=["smoke=true", *overrides])


def run_task(tmp_path: Path, *overrides: str) -> dict:
    from feynkit.experiments.run import run_experiment

    results = run_experiment(task_config(*overrides), tmp_path)
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["metrics"] and all(math.isfinite(v) for v in written["metrics"].values())
    assert written["claims"], "a task states at least one claim"
    failed = [c["name"] for c in written["claims"] if not c["holds"]]
    assert not failed, (failed, written["metrics"])
    assert all((tmp_path / f).is_file() for f in results.figures) and results.figures
    return written


def test_sample_exact_mixture(tmp_path):
    res = run_task(tmp_path, "task=sample", "model=gmm2d", "solver=ddpm")
    m = res["metrics"]
    assert m["nfe"] == 31  # 30 steps + the final denoising
    assert m["devices"] == 2  # samples sharded over both test devices (conftest)
    assert m["energy_distance"] < 0.45 and m["mode_weight_error"] < 0.1
    assert res["config"]["task"]["name"] == "sample"


@pytest.mark.slow
def test_sample_fkc_anneal_command(tmp_path):
    """`task=sample model=gmm2d solver=ddpm corrector=fkc_anneal corrector.beta=2.5`."""
    res = run_task(
        tmp_path, "task=sample", "model=gmm2d", "solver=ddpm", "corrector=fkc_anneal",
        "corrector.beta=2.5",
    )  # fmt: skip
    m = res["metrics"]
    assert math.isfinite(m["log_normalizer"]) and 1 <= m["ess_min"] <= 256
    assert m["energy_distance"] < 0.45  # exact p^2.5 draws; naive sampling scores ~0.7
    assert res["config"]["corrector"]["beta"] == 2.5


@pytest.mark.slow
def test_sample_cfg_with_fkc_cfg(tmp_path):
    res = run_task(
        tmp_path, "task=sample", "model=gmm2d", "guidance=cfg", "guidance.scale=2",
        "corrector=fkc_cfg",
    )  # fmt: skip
    assert res["config"]["corrector"]["scale"] == 2.0  # follows guidance.scale
    assert res["metrics"]["energy_distance"] < 0.45 and res["metrics"]["class_accuracy"] > 0.9


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides",
    [
        ("solver=euler_maruyama", "corrector=fkc_product"),
        ("corrector=fk_steering",),
        ("solver=heun", "guidance=apg", "guidance.scale=5", "data=gmm8_circle"),
        ("guidance=classifier",),
        ("solver=ddim", "guidance=linear_ag"),
        ("model=gmm8d", "solver=dpm_solver_pp_2m", "guidance=adaptive"),
    ],
)
def test_sample_combinations_on_exact_mixtures(tmp_path, overrides):
    res = run_task(tmp_path, "task=sample", *overrides)
    assert res["metrics"]["finite_fraction"] == 1.0


@pytest.mark.slow
def test_sample_learned_toy_model_with_quantized_weights(tmp_path):
    res = run_task(
        tmp_path, "task=sample", "model=toy_mlp", "solver=ddim", "guidance=cfg", "quant=rtn",
        "quant.bits=8",
    )  # fmt: skip
    m = res["metrics"]
    assert m["quant.bits_per_weight"] < 10 and m["mode_accuracy"] > 0.5


@pytest.mark.slow
def test_sample_digits_apg_command(tmp_path):
    """`task=sample model=digits_unet solver=heun guidance=apg guidance.scale=5`."""
    res = run_task(
        tmp_path, "task=sample", "model=digits_unet", "solver=heun", "guidance=apg",
        "guidance.scale=5",
    )  # fmt: skip
    assert res["metrics"]["nfe"] == 4 * 30 + 2  # Heun: 2 evaluations x 2 branches per step


@pytest.mark.slow
def test_sample_digits_fkc_cfg_svdquant_command(tmp_path):
    """`task=sample model=digits_unet solver=ddpm guidance=cfg corrector=fkc_cfg
    quant=svdquant_w4a4`."""
    res = run_task(
        tmp_path, "task=sample", "model=digits_unet", "solver=ddpm", "guidance=cfg",
        "corrector=fkc_cfg", "quant=svdquant_w4a4",
    )  # fmt: skip
    m = res["metrics"]
    # smoke UNet kernels are tiny, so the rank-8 float branch dominates: ~18 bits per weight
    assert 4 < m["quant.bits_per_weight"] < 32 and math.isfinite(m["log_normalizer"])


@pytest.mark.slow
def test_compress_byte_lm_gptq_command(tmp_path):
    """`task=compress model=byte_lm quant=gptq quant.bits=3`."""
    res = run_task(tmp_path, "task=compress", "model=byte_lm", "quant=gptq", "quant.bits=3")
    m = res["metrics"]
    assert 2.5 < m["bits_per_weight"] < 8 and m["layers_compressed"] == 7
    assert m["perplexity.compressed"] > 0.9 * m["perplexity.float"]


@pytest.mark.slow
def test_train_toy_model(tmp_path):
    res = run_task(tmp_path, "task=train", "model=toy_mlp")
    m = res["metrics"]
    assert m["denoising_mse"] < 0.9
    assert (tmp_path / "checkpoints" / "toy_mlp").is_dir()


@pytest.mark.slow
def test_compress_toy_model_rtn(tmp_path):
    res = run_task(tmp_path, "task=compress", "model=toy_mlp", "quant=rtn", "quant.bits=4")
    m = res["metrics"]
    assert m["bytes.compressed"] < m["bytes.float32"] / 2
    assert 0 < m["layer_error.max"] < 0.3 and m["denoising_mse_ratio"] > 0.9


def _fake_job(sweep, num, overrides, metrics, holds):
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    claims = [
        {"name": f"c{i}", "holds": h, "value": 0.0, "bound": 1.0} for i, h in enumerate(holds)
    ]
    results = {"experiment": "sample", "metrics": metrics, "claims": claims, "wall_seconds": 2.0}
    (job / "results.json").write_text(json.dumps(results))


def test_multirun_summary_callback_on_a_sweep_dir(tmp_path):
    from omegaconf import OmegaConf

    from feynkit.experiments.summary import MultirunSummary

    sweep = tmp_path / "sweep"
    _fake_job(sweep, 0, ["solver=ddim", "guidance=cfg"], {"energy_distance": 0.25, "nfe": 61},
              [True, True])  # fmt: skip
    _fake_job(sweep, 1, ["solver=heun", "guidance=cfg"], {"energy_distance": 0.5, "nfe": 121},
              [True, False])  # fmt: skip
    _fake_job(sweep, 10, ["solver=heun", "guidance=apg"],
              {"energy_distance": 0.125, "nfe": 121, "extra": 1.0}, [True])  # fmt: skip
    (sweep / "multirun.yaml").write_text("x: 1\n")
    MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[:2] == ["job", "overrides"] and rows[0].endswith("extra")
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "10"]  # numeric job order
    assert rows[2].split(",")[3:5] == ["1", "2"]  # job 1: one of two claims held
    md = (sweep / "summary.md").read_text()
    assert "| 1 | `solver=heun guidance=cfg` | 1/2 | 0.5 | 121 |" in md
    assert "extra" not in md.split("\n\n")[1]  # only metrics every job has go in the table
    assert (sweep / "summary.png").stat().st_size > 1000


@pytest.mark.slow
def test_multirun_sweep_writes_its_summary(tmp_path):
    """`--multirun task=sample solver=ddim,heun` through the entry point writes summary files
    (the callback configs/config.yaml registers)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-m", "feynkit.experiments.run", "--multirun", "task=sample",
         "model=gmm2d", "solver=ddim,heun", "guidance=cfg", "smoke=true",
         f"hydra.sweep.dir={tmp_path}/sweep",
         ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    md = (tmp_path / "sweep" / "summary.md").read_text()
    assert "solver=ddim" in md and "solver=heun" in md and "energy_distance" in md
    assert (tmp_path / "sweep" / "summary.png").is_file()
