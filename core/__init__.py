"""Core: log-space weights, resampling, noise schedules, checkpointing and sharding helpers.

`core` imports nothing else of feynkit.
"""

from feynkit.core.numerics import bisect
from feynkit.core.resampling import (
    RESAMPLERS,
    ProbabilityVectorWarning,
    adaptive_resample,
    get_resampler,
    log_weights_ok,
    multinomial_resample,
    offspring_counts,
    resample,
    resample_particles,
    residual_resample,
    stratified_resample,
    systematic_resample,
)
from feynkit.core.schedules import (
    CosineSchedule,
    LinearSchedule,
    RectifiedFlowSchedule,
    VPSchedule,
    get_schedule,
)
from feynkit.core.validation import check_reward_shape, check_time_grid
from feynkit.core.weights import (
    check_log_weights,
    conditional_ess,
    ess,
    log_ess,
    log_mean_exp,
    normalize_log_weights,
)

__all__ = [
    "RESAMPLERS",
    "CosineSchedule",
    "ProbabilityVectorWarning",
    "LinearSchedule",
    "RectifiedFlowSchedule",
    "VPSchedule",
    "adaptive_resample",
    "bisect",
    "check_log_weights",
    "check_reward_shape",
    "check_time_grid",
    "conditional_ess",
    "ess",
    "get_resampler",
    "get_schedule",
    "log_ess",
    "log_mean_exp",
    "log_weights_ok",
    "multinomial_resample",
    "normalize_log_weights",
    "offspring_counts",
    "resample",
    "resample_particles",
    "residual_resample",
    "stratified_resample",
    "systematic_resample",
]

from feynkit.core.checkpoint import checkpointed_loop, restore_latest, save_checkpoint  # noqa: E402
from feynkit.core.sharding import (  # noqa: E402
    check_divisible,
    particle_mesh,
    particle_sharding,
    shard_particles,
)

__all__ += [
    "check_divisible",
    "checkpointed_loop",
    "particle_mesh",
    "particle_sharding",
    "restore_latest",
    "save_checkpoint",
    "shard_particles",
]
