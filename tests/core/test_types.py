"""The role protocols describe the objects the code passes around."""

import jax.numpy as jnp

from feynkit.core import CosineSchedule, LinearSchedule, RectifiedFlowSchedule, VPSchedule
from feynkit.core.types import Schedule


def test_every_schedule_implements_the_schedule_protocol():
    for sched in (LinearSchedule(), CosineSchedule(), RectifiedFlowSchedule()):
        assert isinstance(sched, Schedule), type(sched).__name__
        assert isinstance(sched, VPSchedule) or isinstance(sched, RectifiedFlowSchedule)
        t = jnp.asarray(0.3)
        # log SNR is what the protocol says it is.
        lam = 2 * (jnp.log(sched.alpha(t)) - jnp.log(sched.sigma(t)))
        assert jnp.allclose(sched.log_snr(t), lam, atol=1e-5)


def test_an_object_missing_a_coefficient_is_not_a_schedule():
    class AlphaSigmaOnly:
        def alpha(self, t):
            return t

        def sigma(self, t):
            return t

    assert not isinstance(AlphaSigmaOnly(), Schedule)
