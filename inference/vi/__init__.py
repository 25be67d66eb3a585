"""Variational inference: objectives chosen apart from gradient estimators, families, fitting,
sparse subspace VI, posterior-collapse diagnostics and Bayesian estimation of DP's ε."""

from feynkit.inference.vi import privacy  # noqa: E402  (ε posteriors for DP)
from feynkit.inference.vi.diagnostics import (
    CollapseReport,
    active_units,
    collapse_report,
    kl_per_dimension,
)
from feynkit.inference.vi.families import FullRankGaussian, MeanFieldGaussian
from feynkit.inference.vi.fit import FitState, fit
from feynkit.inference.vi.objectives import (
    ESTIMATORS,
    bound_value,
    elbo,
    iwae,
    local_joint_order_bound,
    make_objective,
    renyi,
    rws,
    vimco,
)

__all__ = [
    "CollapseReport",
    "active_units",
    "collapse_report",
    "kl_per_dimension",
    "privacy",
    "ESTIMATORS",
    "FitState",
    "FullRankGaussian",
    "MeanFieldGaussian",
    "bound_value",
    "elbo",
    "fit",
    "iwae",
    "local_joint_order_bound",
    "make_objective",
    "renyi",
    "rws",
    "vimco",
]
