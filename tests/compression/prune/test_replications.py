"""Smoke runs of the pruning replications (slow: they train the smoke LM)."""

import pytest

from tests.experiments.smoke import smoke_run


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prune_ppl", "prune_gradual"])
def test_smoke(tmp_path, name):
    res = smoke_run(name, tmp_path)
    failed = [c["name"] for c in res["claims"] if c.get("smoke") and not c["holds"]]
    assert not failed
