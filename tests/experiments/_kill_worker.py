"""A run the kill tests SIGKILL and restart: ``python _kill_worker.py {train,smc} DIR OUT``.

It trains a small score MLP (`experiments.train.train`) or runs FKC with checkpoints
(`inference.smc.base.run_checkpointed`), checkpointing into DIR often, and writes the final
numbers to OUT (.npz) when it completes. Every step's randomness comes from the step count, so
a restarted run must end with the uninterrupted run's numbers.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

TRAIN_STEPS, TRAIN_EVERY = 300, 25
SMC_STEPS, SMC_EVERY = 160, 8


def train(directory: str) -> dict[str, np.ndarray]:
    from feynkit.experiments import train as tr
    from feynkit.experiments.data import gaussian_mixture_2d
    from feynkit.models import ScoreMLP

    tr.quiet_checkpoint_logging()
    model = ScoreMLP(hidden=32, num_layers=1, num_classes=8, time_features=16)
    params = model.init_params(jax.random.key(1), 2)
    data = gaussian_mixture_2d(jax.random.key(0), 512)
    loss_fn = tr.denoising_score_loss(model.forward, num_classes=8)
    state, history = tr.train(
        loss_fn,
        optax.adam(3e-3),
        params,
        tr.array_batch_fn(32),
        jax.random.key(3),
        TRAIN_STEPS,
        data=data,
        checkpoint_dir=directory,
        checkpoint_every=TRAIN_EVERY,
        log_every=TRAIN_EVERY,
        steps_per_call=TRAIN_EVERY,
        progress=False,
    )
    leaves = jax.tree.leaves(state.params)
    out = {f"p{i}": np.asarray(v) for i, v in enumerate(leaves)} | {"step": np.asarray(state.step)}
    # the training history of the whole run, also when it resumed after a kill
    out["history_steps"] = np.asarray([h[0] for h in history])
    out["history_loss"] = np.asarray([h[1] for h in history])
    return out


def smc(directory: str) -> dict[str, np.ndarray]:
    from feynkit.core.schedules import LinearSchedule
    from feynkit.experiments.train import quiet_checkpoint_logging
    from feynkit.inference import smc as fk

    quiet_checkpoint_logging()
    sched = LinearSchedule()

    def score(x, t):  # data N(1, 0.5² I): the VP marginal is N(α, α² 0.25 + σ²)
        a = sched.alpha(t)
        return -(x - a) / (a**2 * 0.25 + 1 - a**2)

    sde = fk.annealed_sde(score, sched, 2.0)
    key_init, key_run = jax.random.split(jax.random.key(4))
    state0 = fk.fkc_init(key_init, sde, 128, 2)
    kernel = fk.fkc_kernel(sde, SMC_STEPS)
    state, _ = fk.run_checkpointed(key_run, kernel, state0, SMC_STEPS, directory, every=SMC_EVERY)
    return {
        "x": np.asarray(state.particles),
        "log_w": np.asarray(state.log_weights),
        "log_z": np.asarray(state.log_normalizer),
        "step": np.asarray(state.step),
    }


if __name__ == "__main__":
    kind, directory, out = sys.argv[1:4]
    result = {"train": train, "smc": smc}[kind](directory)
    np.savez(out, **result)
    jnp.zeros(()).block_until_ready()
