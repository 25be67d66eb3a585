"""A linear layer whose inputs have outlier channels (as LLM activations do), shared by the
SmoothQuant and SVDQuant tests, and the relative output error they score against float64."""

import numpy as np


def outlier_layer(seed=0, n=256, d_in=64, d_out=48, boost=30.0, num_outliers=3):
    """Gaussian inputs (n, d_in) with the first `num_outliers` channels scaled by `boost`, and a
    (d_in, d_out) weight with unit-variance outputs."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    x[:, :num_outliers] *= boost
    w = (rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)).astype(np.float32)
    return x, w


def rel_err(x, w, out):
    """‖out − x w‖² / ‖x w‖² with the product in float64."""
    y = x.astype(np.float64) @ w.astype(np.float64)
    return float(np.sum((np.asarray(out, np.float64) - y) ** 2) / np.sum(y**2))
