"""Config groups: every option composes and instantiates, schemas reject bad keys and types with
the valid keys named, and `validate_combination` stops combinations that cannot work before
any model is built."""

import inspect

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from feynkit.experiments import tasks
from feynkit.experiments.tasks import build
from feynkit.experiments.tasks.schemas import (
    GROUPS,
    SETUP_KEYS,
    config_dir,
    import_target,
    option_names,
)

PRIMARY = "_tasks_test_primary"
# Factory arguments that are objects, not config values (never in a YAML).
NOT_CONFIG = {"rejuvenation", "scale_schedule", "devices"}


def _register():
    tasks.register_configs()
    ConfigStore.instance().store(
        name=PRIMARY,
        node={"defaults": [{"task": "sample"}, "_self_"], "seed": 0, "smoke": True},
    )


def compose_cfg(*overrides: str):
    _register()
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        return compose(PRIMARY, overrides=list(overrides))


def test_every_group_has_its_options():
    expected = {
        "model": {"gmm2d", "gmm8d", "toy_mlp", "digits_unet", "byte_lm", "vae"},
        "solver": {"euler_maruyama", "ddpm", "ddim", "heun", "dpm_solver_pp_2m",
                   "probability_flow", "flow_euler"},
        "guidance": {"none", "cfg", "cfg_pp", "apg", "adaptive", "linear_ag", "classifier"},
        "corrector": {"none", "fkc_anneal", "fkc_product", "fkc_cfg", "fk_steering"},
        "quant": {"none", "rtn", "gptq", "spqr", "vptq", "svdquant_w4a4", "smoothquant",
                  "dfloat11"},
        "data": {"auto", "gmm8_circle", "digits", "stdlib_bytes"},
    }  # fmt: skip
    for group, names in expected.items():
        assert names <= set(option_names(group)), group
    assert {"local", "local_parallel", "submitit_slurm"} <= set(option_names("launcher"))


@pytest.mark.parametrize("group", GROUPS)
def test_yaml_keys_are_factory_arguments_and_all_are_visible(group):
    """Each option's values are arguments of its `_target_`, and every configurable argument
    of the factory appears in the YAML (values visible, not hidden defaults)."""
    from feynkit.experiments.tasks.validate import _CALL_TIME

    for option in option_names(group):
        node = OmegaConf.load(config_dir() / group / f"{option}.yaml")
        target = node.get("_target_")
        keys = {k for k in node if k not in ("defaults", "_target_") and k not in SETUP_KEYS}
        if target is None:
            assert not keys, (group, option)
            continue
        fn = import_target(target)
        params = inspect.signature(fn).parameters
        cls = getattr(fn, "config_class", None)
        if cls is not None:  # model builders: their zoo config's fields
            import dataclasses

            accepted = {f.name for f in dataclasses.fields(cls)}
            assert keys == accepted, (option, keys ^ accepted)
            continue
        assert keys <= set(params), (group, option, keys - set(params))
        configurable = {
            n
            for n, p in params.items()
            if p.default is not inspect.Parameter.empty
            and n not in _CALL_TIME[group]
            and n not in NOT_CONFIG
        }
        assert configurable <= keys, (group, option, configurable - keys)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in option_names(group):
        cfg = compose_cfg(f"{group}={option}")
        assert OmegaConf.select(cfg, f"{group}._target_", default="x") != "x"


def test_command_line_values_override_and_are_typed():
    cfg = compose_cfg("guidance=apg", "guidance.scale=5", "solver=ddim", "solver.eta=1")
    assert cfg.guidance.scale == 5.0 and isinstance(cfg.guidance.scale, float)
    assert cfg.solver.eta == 1.0
    assert cfg.task.name == "sample" and cfg.model._target_.endswith("gaussian_mixture")


def test_unknown_key_error_names_the_valid_keys():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("guidance=apg", "guidance.scael=5")
    msg = str(e.value.__cause__)
    assert "scael" in msg and "valid keys: scale, eta, momentum, norm_threshold" in msg


def test_wrong_type_is_rejected_at_composition():
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg("guidance=cfg", "guidance.scale=strong")
    assert "guidance.scale" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        compose_cfg("task.num_samples=many")
    with pytest.raises(ConfigCompositionException):
        compose_cfg("quant=rtn", "quant.bits=four")
    with pytest.raises(ConfigCompositionException) as e:  # model values: the zoo config's types
        compose_cfg("model=toy_mlp", "model.steps=long")
    assert "valid keys: cache_dir, num_modes" in str(e.value.__cause__)


def test_unknown_option_lists_the_choices():
    with pytest.raises(MissingConfigException) as e:
        compose_cfg("solver=rk45")
    assert "heun" in str(e.value) and "ddpm" in str(e.value)


def test_appended_key_is_caught_by_validation_with_valid_keys():
    cfg = compose_cfg("guidance=cfg", "+guidance.foo=1")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['foo'\]; valid keys: \['scale'"):
        tasks.validate_combination(cfg)


def test_fkc_cfg_scale_follows_guidance_scale():
    cfg = compose_cfg("guidance=cfg", "guidance.scale=4.5", "corrector=fkc_cfg")
    assert cfg.corrector.scale == 4.5
    assert compose_cfg("corrector=fkc_cfg").corrector.scale == 3.0  # guidance=none: default


@pytest.mark.parametrize("option", option_names("solver"))
def test_solvers_instantiate_with_the_schedule(option):
    from feynkit.core.schedules import LinearSchedule
    from feynkit.inference.diffusion import Solver

    cfg = compose_cfg(f"solver={option}")
    bundle = tasks.ModelBundle("m", "diffusion", None, None, schedule=LinearSchedule())
    solver = build.build_solver(cfg, bundle)
    assert isinstance(solver, Solver) and solver.schedule is bundle.schedule


@pytest.mark.parametrize("option", ["cfg", "cfg_pp", "apg", "adaptive"])
def test_guidance_instantiates(option):
    from feynkit.core.schedules import LinearSchedule
    from feynkit.inference.diffusion import Guidance

    cfg = compose_cfg(f"guidance={option}")
    bundle = tasks.ModelBundle("m", "diffusion", None, None, schedule=LinearSchedule())
    assert isinstance(build.build_guidance(cfg, bundle), Guidance)
    assert build.build_guidance(compose_cfg("guidance=none"), bundle) is None


@pytest.mark.parametrize("option", [o for o in option_names("quant") if o != "none"])
def test_quant_options_instantiate_to_recipes(option):
    from feynkit.compression.quant import QuantRecipe

    cfg = compose_cfg("model=toy_mlp", f"quant={option}")
    bundle = tasks.ModelBundle("m", "diffusion", None, None, quant_where=r"(.*/)?kernel")
    recipe = build.build_quant(cfg, bundle)
    assert isinstance(recipe, QuantRecipe)
    # Options whose recipe needs statistics say how many calibration samples to take.
    assert recipe.needs_calibration == ("calibration" in cfg.quant)


@pytest.mark.parametrize("option", [o for o in option_names("corrector") if o != "none"])
def test_correctors_instantiate(option):
    from feynkit.core.schedules import LinearSchedule
    from feynkit.inference.smc import Corrector

    cfg = compose_cfg(f"corrector={option}")
    bundle = tasks.ModelBundle(
        "m", "diffusion", None, None, schedule=LinearSchedule(), classifier_logits=None
    )
    assert isinstance(build.build_corrector(cfg, bundle), Corrector)


BAD = [
    (("solver=heun", "corrector=fkc_anneal"), r"corrector=fkc_anneal needs a stochastic solver"),
    (("solver=ddim", "corrector=fkc_cfg"), r"solver=ddim \(deterministic\)"),
    (("solver=dpm_solver_pp_2m", "corrector=fk_steering"), r"never separate"),
    (("model=toy_mlp", "guidance=classifier"), r"guidance=classifier needs a model with a class"),
    (("quant=rtn",), r"quant=rtn acts on parameters.*model=gmm2d is an analytic target"),
    (("model=toy_mlp", "corrector=fkc_product"), r"fkc_product needs a model with two experts"),
    (("guidance=apg", "corrector=fkc_cfg"), r"fkc_cfg reweights CFG; guidance=apg"),
    (
        ("guidance=cfg", "corrector=fkc_cfg", "corrector.scale=2"),
        r"corrector.scale=2 differs from guidance.scale=3.0",
    ),
    (("guidance=cfg", "corrector=fkc_anneal"), r"fkc_anneal supplies its own drift"),
    (("model=byte_lm",), r"task=sample samples diffusion models; model=byte_lm"),
    (("data=digits",), r"data=digits holds digits data, and model=gmm2d is compared with points"),
    (("model=gmm8d", "data=two_moons"), r"model=gmm8d is compared with its own target only"),
]


@pytest.mark.parametrize(("overrides", "match"), BAD)
def test_bad_combinations_fail_before_any_model_is_built(overrides, match, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the model was built before validation")

    monkeypatch.setattr(build, "build_model", never)
    cfg = OmegaConf.merge(compose_cfg(*overrides))
    cfg = _with_choices(cfg, overrides)
    with pytest.raises(ValueError, match=match):
        tasks.TASKS["sample"](cfg, None)


def _with_choices(cfg, overrides):
    """Hydra's runtime choices, as a real run has them (the errors name the options)."""
    choices = {"model": "gmm2d", "solver": "ddpm", "guidance": "none", "corrector": "none",
               "quant": "none", "data": "auto"}  # fmt: skip
    for o in overrides:
        k, _, v = o.partition("=")
        if "." not in k:
            choices[k] = v
    OmegaConf.set_struct(cfg, False)
    cfg.hydra = {"runtime": {"choices": choices}}
    return cfg


def test_compress_and_train_reject_analytic_models(monkeypatch):
    monkeypatch.setattr(build, "build_model", None)
    cfg = _with_choices(compose_cfg("task=compress", "model=gmm2d"), ["model=gmm2d"])
    with pytest.raises(ValueError, match="task=compress needs a model with parameters"):
        tasks.TASKS["compress"](cfg, None)
    cfg = _with_choices(compose_cfg("task=train", "model=gmm8d"), ["model=gmm8d"])
    with pytest.raises(ValueError, match="task=train trains a learned model"):
        tasks.TASKS["train"](cfg, None)


def test_launchers_compose():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    _register()
    cs = ConfigStore.instance()
    cs.store(name="_launcher_primary", node={"defaults": [{"launcher": "local"}, "_self_"]})
    with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
        for name, target in (
            ("local", "BasicLauncher"),
            ("local_parallel", "LocalLauncher"),
            ("submitit_slurm", "SlurmLauncher"),
        ):
            cfg = compose(
                "_launcher_primary", overrides=[f"launcher={name}"], return_hydra_config=True
            )
            assert cfg.hydra.launcher._target_.endswith(target)
        cfg = compose(
            "_launcher_primary",
            overrides=["launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
        assert cfg.hydra.launcher.partition == "gpu"
