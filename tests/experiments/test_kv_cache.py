"""Smoke run of the `kv_cache` replication through the Hydra entry point."""

import pytest

from tests.experiments.smoke import smoke_run


@pytest.mark.slow  # ~25 s of CPU: four compiled decoding loops
def test_kv_cache_smoke(tmp_path):
    written = smoke_run("kv_cache", tmp_path)
    m = written["metrics"]
    for name in ("uniform2", "gear", "uniform3", "ems"):
        assert 0.0 <= m[f"agreement.{name}"] <= 1.0 and m[f"compression.{name}"] > 1.0
    # More bits, less compression; GEAR's extras cost bytes over plain 2-bit.
    assert m["compression.uniform2"] > m["compression.uniform3"]
    assert m["compression.uniform2"] > m["compression.gear"]
    assert all(c["holds"] for c in written["claims"])
