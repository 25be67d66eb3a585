"""`validate_combination`: the checks a config must pass before any model is built or compiled.

Hydra's schemas check each option on its own (known keys, types); this checks that the options
work together — a corrector the solver can serve, a model that has what guidance, corrector and
quantizer need — and raises one `ValueError` that says what to change.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from feynkit.experiments.tasks.schemas import (
    SETUP_KEYS,
    factory_parameters,
    import_target,
)

__all__ = [
    "DETERMINISTIC_SOLVERS",
    "STOCHASTIC_SOLVERS",
    "option_name",
    "validate_combination",
]

STOCHASTIC_SOLVERS = ("euler_maruyama", "ddpm")
DETERMINISTIC_SOLVERS = (
    "heun",
    "dpm_solver_pp_2m",
    "probability_flow",
    "probability_flow_heun",
    "flow_euler",
    "flow_heun",
)
_TASK_GROUPS = {
    "sample": ("model", "solver", "guidance", "corrector", "quant", "data"),
    "compress": ("model", "quant", "prune", "data"),
    "train": ("model",),
}
# Arguments the task passes at instantiation, per group (never set in a YAML).
_CALL_TIME = {
    "model": {"seed", "smoke"},
    "solver": {"schedule"},
    "guidance": {"schedule", "denoise_fn", "logits_fn", "coefficients", "scale_schedule"},
    "corrector": {"reward_fn", "schedule"},
    "quant": set(),
    "prune": set(),
    "data": {"key", "n"},
    "decoder": set(),
}


def _name(node) -> str | None:
    t = None if node is None else node.get("_target_")
    return None if t is None else str(t).rpartition(".")[2]


def option_name(cfg: DictConfig, group: str) -> str:
    """The option name as the user wrote it (from Hydra's choices when available)."""
    choices = OmegaConf.select(cfg, "hydra.runtime.choices")
    if choices is None:
        try:
            from hydra.core.hydra_config import HydraConfig

            choices = HydraConfig.get().runtime.choices
        except ValueError:  # composed without Hydra's runtime: name the factory
            choices = {}
    return choices.get(group) or _option_of(group, cfg.get(group))


def _option_of(group: str, node) -> str:
    """The option of `group` whose YAML has this node's ``_target_`` (first match)."""
    from feynkit.experiments.tasks.schemas import config_dir, option_names

    target = None if node is None else node.get("_target_")
    for option in option_names(group):
        yaml = OmegaConf.load(config_dir() / group / f"{option}.yaml")
        if yaml.get("_target_") == target:
            return option
    return _name(node) or "none"


def _check_keys(cfg: DictConfig, group: str) -> None:
    """Every key of the option is an argument of its factory (catches ``+group.key=...``)."""
    node = cfg.get(group)
    target = None if node is None else node.get("_target_")
    if target is None:
        extra = [k for k in node or {} if not str(k).startswith("_")]
        if extra:
            raise ValueError(
                f"{group}={option_name(cfg, group)} takes no values, got {extra}; remove them."
            )
        return
    fn = import_target(target)
    params = factory_parameters(fn)
    valid = [k for k in params if k not in _CALL_TIME.get(group, ())] + [
        k for k in SETUP_KEYS if k in node
    ]
    unknown = [k for k in node if not str(k).startswith("_") and k not in valid]
    if unknown:
        raise ValueError(
            f"{group}={option_name(cfg, group)}: unknown key(s) {unknown}; valid keys: {valid}."
        )


_LM_ONLY_PRUNERS = {
    "flap": "FLAP prunes TransformerLM heads and MLP channels",
    "evopress": "its fitness is the next-byte KL from the dense LM",
    "dare": "it acts on the byte LM's fine-tunes (zoo.finetuned_lms)",
}
_UNQUANTIZED_PRUNERS = {
    "wina": "activation sparsity gates the forward pass and leaves the weights as they are",
    "dare": "its result is a fine-tune, measured against the fine-tune it came from",
}


def _check_prune_option(cfg: DictConfig, opt: dict, kind: str | None) -> None:
    """The task-level pruners of `prune_options`: the model they need, quant=none where
    quantization has nothing to act on, EvoPress's stage windows within its calibration."""
    name = _name(cfg.get("prune"))
    if name in _LM_ONLY_PRUNERS and kind != "lm":
        raise ValueError(
            f"prune={opt['prune']} needs model=byte_lm ({_LM_ONLY_PRUNERS[name]}); "
            f"model={opt['model']} is a {kind} model."
        )
    if name in _UNQUANTIZED_PRUNERS and _name(cfg.quant) is not None:
        raise ValueError(
            f"prune={opt['prune']} with quant={opt['quant']}: {_UNQUANTIZED_PRUNERS[name]}; "
            "use quant=none."
        )
    if name == "dare" and _name(cfg.get("data")) is not None:
        raise ValueError(
            f"prune=dare scores the fine-tune's own subset (prune.subset); data={opt['data']} "
            "does not apply: use data=auto."
        )
    if name == "evopress":
        n = int((cfg.prune.get("calibration") or {}).get("num_samples", 32))
        windows = list(cfg.prune.get("stage_windows") or [])
        if windows and max(windows) > n:
            raise ValueError(
                f"prune.stage_windows={windows} scores more windows than "
                f"prune.calibration.num_samples={n}; raise num_samples or lower stage_windows."
            )


def validate_combination(cfg: DictConfig) -> None:
    """Raise `ValueError` if the groups of `cfg` cannot work together (before any JAX work).

    Checks: every option's keys are its factory's arguments; a task's model is of a kind the
    task serves; FKC correctors need a stochastic solver; fkc_product a model with experts;
    fkc_cfg guidance none or cfg (with the same scale); classifier guidance a model with a
    classifier; quantization a model with parameters (not an analytic target).
    """
    task = cfg.task.name
    groups = _TASK_GROUPS.get(task)
    if groups is None:
        raise ValueError(f"task.name={task!r}: generic tasks are {sorted(_TASK_GROUPS)}.")
    for g in groups:
        if cfg.get(g) is None:
            raise ValueError(f"task={task} needs a {g} option; add {g}=<option>.")
        _check_keys(cfg, g)
    opt = {g: option_name(cfg, g) for g in groups}
    builder = import_target(cfg.model._target_)
    kind = getattr(builder, "kind", None)
    model = opt["model"]
    data = cfg.get("data")
    if data is not None and _name(data) is not None:
        from feynkit.experiments.tasks.build import DATA_KINDS

        want = getattr(builder, "data_kind", None)
        if builder.__name__ == "gaussian_mixture" and int(cfg.model.get("dim", 2)) != 2:
            want = None
        have = DATA_KINDS.get(_name(data))
        if have != want:
            raise ValueError(
                f"data={opt['data']} holds {have} data, and model={model} is compared with "
                f"{want or 'its own target only'}: use data=auto or data of the model's kind."
            )
    if task == "sample" and kind != "diffusion":
        raise ValueError(
            f"task=sample samples diffusion models; model={model} is a {kind} model "
            "(use task=compress or task=train with it)."
        )
    if task == "train" and getattr(builder, "analytic", False):
        raise ValueError(
            f"task=train trains a learned model; model={model} is an analytic target "
            "(use model=toy_mlp, digits_unet, byte_lm or vae)."
        )
    if task == "compress" and getattr(builder, "analytic", False):
        raise ValueError(
            f"task=compress needs a model with parameters; model={model} is an analytic target."
        )
    if "quant" in groups and _name(cfg.quant) is not None and getattr(builder, "analytic", False):
        raise ValueError(
            f"quant={opt['quant']} acts on parameters, and model={model} is an "
            "analytic target with none: use quant=none or a learned model (toy_mlp, digits_unet)."
        )
    if task == "compress" and _name(cfg.quant) is None and _name(cfg.get("prune")) is None:
        raise ValueError(
            "task=compress needs a quantizer or a pruner: add quant=<option> (e.g. quant=rtn) "
            "or prune=<option> (e.g. prune=sparsegpt)."
        )
    if task == "compress":
        _check_prune_option(cfg, opt, kind)
    if task != "sample":
        return
    if _name(cfg.get("prune")) is not None:
        raise ValueError(
            f"prune={option_name(cfg, 'prune')}: task=sample does not prune; run task=compress "
            "with prune= (and quant=) to measure a pruned model."
        )
    solver = _name(cfg.solver)
    corrector = _name(cfg.corrector)
    guidance = _name(cfg.guidance)
    stochastic = solver in STOCHASTIC_SOLVERS or (
        solver == "ddim" and float(cfg.solver.get("eta", 0.0)) > 0
    )
    if corrector is not None and corrector.startswith("fkc") and not stochastic:
        raise ValueError(
            f"corrector={opt['corrector']} needs a stochastic solver: its weights for "
            f"solver={opt['solver']} (deterministic) would need the score's divergence. "
            f"Use solver=euler_maruyama, solver=ddpm or solver=ddim solver.eta=1."
        )
    if corrector == "fk_steering_corrector" and not stochastic:
        raise ValueError(
            f"corrector=fk_steering with solver={opt['solver']} (deterministic): "
            "resampled copies never separate. Use a stochastic solver (ddpm, euler_maruyama)."
        )
    if corrector == "fkc_product_corrector":
        if not getattr(builder, "has_experts", False):
            raise ValueError(
                f"corrector=fkc_product needs a model with two experts; model={model} has none "
                "(use model=gmm2d or model=gmm8d)."
            )
        if guidance is not None:
            raise ValueError(
                "corrector=fkc_product samples the product of the model's experts; it supplies "
                f"its own drift, so use guidance=none (got guidance={opt['guidance']})."
            )
    if corrector == "fkc_anneal_corrector" and guidance is not None:
        raise ValueError(
            "corrector=fkc_anneal supplies its own drift (score x beta); use guidance=none "
            f"(got guidance={opt['guidance']})."
        )
    if corrector == "fkc_cfg_corrector":
        if guidance not in (None, "cfg"):
            raise ValueError(
                f"corrector=fkc_cfg reweights CFG; guidance={opt['guidance']} has other "
                "dynamics. Use guidance=cfg (same scale) or guidance=none."
            )
        if guidance == "cfg" and float(cfg.corrector.scale) != float(cfg.guidance.scale):
            raise ValueError(
                f"corrector.scale={cfg.corrector.scale} differs from guidance.scale="
                f"{cfg.guidance.scale}; FKC-CFG corrects the CFG run of the same scale."
            )
    if guidance == "classifier_guided_model" and not getattr(builder, "has_classifier", False):
        raise ValueError(
            f"guidance=classifier needs a model with a classifier; model={model} has none "
            "(use model=digits_unet or model=gmm2d, or guidance=cfg)."
        )
    if guidance is not None or corrector in ("fkc_cfg_corrector",):
        label = cfg.task.get("label")
        if label is not None and label < 0:
            raise ValueError(f"task.label={label}: a class index >= 0, or null for uniform labels.")
    if not OmegaConf.is_missing(cfg.task, "num_steps") and int(cfg.task.num_steps) < 1:
        raise ValueError(f"task.num_steps={cfg.task.num_steps}: must be >= 1.")
