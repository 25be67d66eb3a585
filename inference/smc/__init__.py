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

from feynkit.inference.smc.steering import (  # noqa: E402
    POTENTIALS,
    SteeringResult,
    best_of_n,
    fk_steering,
)

__all__ += ["POTENTIALS", "SteeringResult", "best_of_n", "fk_steering"]

from feynkit.inference.smc.verifier import (  # noqa: E402
    resample_until_accepted,
    verifier_accuracy,
    verifier_ceiling,
)

__all__ += ["resample_until_accepted", "verifier_accuracy", "verifier_ceiling"]
