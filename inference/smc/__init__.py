"""Sequential Monte Carlo and Feynman–Kac correctors."""

from feynkit.inference.smc.base import (
    SMCInfo,
    SMCState,
    build_kernel,
    init,
    run,
    run_checkpointed,
)

__all__ = ["SMCInfo", "SMCState", "build_kernel", "init", "run", "run_checkpointed"]

from feynkit.inference.smc.fkc import (  # noqa: E402
    WeightedSDE,
    annealed_sde,
    cfg_sde,
    fkc_init,
    fkc_kernel,
    fkc_sample,
    geometric_sde,
    product_sde,
)

__all__ += [
    "WeightedSDE",
    "annealed_sde",
    "cfg_sde",
    "fkc_init",
    "fkc_kernel",
    "fkc_sample",
    "geometric_sde",
    "product_sde",
]

from feynkit.inference.smc.corrector import (  # noqa: E402
    CorrectedParticles,
    CorrectedSampler,
    CorrectedShared,
    Corrector,
    Rejuvenation,
    corrected_sample,
    corrected_sampler,
    resolve_resampler,
)

__all__ += [
    "CorrectedParticles",
    "CorrectedSampler",
    "CorrectedShared",
    "Corrector",
    "Rejuvenation",
    "corrected_sample",
    "corrected_sampler",
    "resolve_resampler",
]

from feynkit.inference.smc.fkc_corrector import (  # noqa: E402
    FKC_SOLVERS,
    fkc_anneal_corrector,
    fkc_cfg_corrector,
    fkc_geometric_corrector,
    fkc_product_corrector,
    fkc_rate,
)

__all__ += [
    "FKC_SOLVERS",
    "fkc_anneal_corrector",
    "fkc_cfg_corrector",
    "fkc_geometric_corrector",
    "fkc_product_corrector",
    "fkc_rate",
]

from feynkit.inference.smc.rejuvenation import langevin_rejuvenation  # noqa: E402

__all__ += ["langevin_rejuvenation"]

from feynkit.inference.smc.steering import (  # noqa: E402
    POTENTIALS,
    SteeringResult,
    best_of_n,
    fk_steering,
    fk_steering_corrector,
)

__all__ += ["POTENTIALS", "SteeringResult", "best_of_n", "fk_steering", "fk_steering_corrector"]

from feynkit.inference.smc.verifier import (  # noqa: E402
    resample_until_accepted,
    verifier_accuracy,
    verifier_ceiling,
)

__all__ += ["resample_until_accepted", "verifier_accuracy", "verifier_ceiling"]
