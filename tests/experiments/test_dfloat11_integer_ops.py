"""dfloat11 and integer_ops: smoke runs end to end (train_lm's smoke model, trained once)."""

import pytest

from tests.experiments.smoke import smoke_run


@pytest.mark.slow
def test_dfloat11_smoke(tmp_path):
    res = smoke_run("dfloat11", tmp_path)
    m = res["metrics"]
    # lossless on any model, trained or not
    assert m["mismatching_values"] == 0
    assert m["max_abs_logit_diff_dfloat11_vs_bf16"] == 0
    assert m["val_loss_dfloat11"] == m["val_loss_bf16"]
    # 8 raw bits + a Huffman code of at most entropy + 1 bits, plus tables and offsets
    # (each matrix has its own code: the bound holds for the size-weighted per-matrix entropy)
    h = m["exponent_entropy_bits.per_matrix_mean"]
    assert h <= m["mean_code_bits"] < h + 1
    assert (8 + m["mean_code_bits"]) / 16 < m["size_fraction.matrices"] < 1.0


@pytest.mark.slow
def test_integer_ops_smoke(tmp_path):
    res = smoke_run("integer_ops", tmp_path)
    m = res["metrics"]
    for name in ("shiftmax.8bit", "shift_silu.16bit", "shift_gelu.8bit", "i_layernorm.12bit"):
        assert 0 < m[f"{name}.max_error_over_bound"] <= 1.0
    assert all(c["holds"] for c in res["claims"] if "derived bound" in c["name"])
