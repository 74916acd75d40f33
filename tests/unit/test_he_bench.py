"""The HE benchmark's claims on a small model: same FedAvg, far fewer bytes than FLARE's own HE."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinfed.bench.he_bench import CONTENDERS, bench_model, format_table, run_he_bench

KEYS = {
    "bytes_per_param",
    "download_bytes_per_param",
    "encrypt_seconds",
    "aggregate_seconds",
    "decrypt_seconds",
    "round_seconds",
    "max_rel_error",
    "max_error_noise_std",
    "server_peak_rss_mb",
    "site_peak_rss_mb",
    "params",
    "sites",
    "repeats",
}


@pytest.fixture(scope="module")
def result():
    return run_he_bench(params=20_000, sites=3, seed=1, repeats=3)


def test_every_contender_reports_the_same_fields(result):
    assert list(result) == list(CONTENDERS)
    for name, row in result.items():
        assert set(row) >= KEYS, name
        assert row["params"] == 20_000 and row["sites"] == 3 and row["repeats"] == 3
        parts = row["encrypt_seconds"] + row["aggregate_seconds"] + row["decrypt_seconds"]
        assert row["round_seconds"] == pytest.approx(parts)
        assert len(row["round_seconds_runs"]) == 3
        assert row["server_peak_rss_mb"] >= 0 and row["site_peak_rss_mb"] >= 0
    assert result["plaintext"]["bytes_per_param"] == 4.0
    assert result["plaintext"]["encrypt_seconds"] == result["plaintext"]["decrypt_seconds"] == 0.0
    assert result["flare_he"]["context"]["poly_modulus_degree"] == 8192
    assert result["ours"]["context"]["security_bits"] == 128
    assert (
        result["ours"]["context"]["rounding"] == "stochastic"
        and result["ours_fixed"]["context"]["fields_per_half_slot"] == 2
    )
    flare_params = result["ours_flare_params"]["context"]
    assert flare_params["poly_modulus_degree"] == 8192 and flare_params["coeff_mod_bit_sizes"] == [60, 40, 40]
    assert flare_params["global_scale_bits"] == 40
    assert result["ours_real"]["context"]["poly_modulus_degree"] == 4096
    json.dumps(result)  # the CLI writes it as JSON


def test_ours_matches_fedavg_and_undercuts_flare_he_bytes(result):
    ours, fixed, flare = result["ours"], result["ours_fixed"], result["flare_he"]
    # the noise-tied grid: error ≤ sites·δ = σ/10, far below the noise the updates already carry
    assert ours["max_error_noise_std"] <= 0.1 and result["ours_secagg"]["max_error_noise_std"] <= 0.1
    assert ours["clamped_values"] == 0 and ours["quantum"] == pytest.approx(ours["noise_std"] / 30)
    assert fixed["max_rel_error"] <= 1e-4
    assert flare["max_rel_error"] <= 1e-4  # FLARE's path was really driven end to end
    assert ours["bytes_per_param"] < flare["bytes_per_param"]
    assert ours["ciphertext_bytes_per_param"] < 0.5 * flare["ciphertext_bytes_per_param"]
    # the same engineering at FLARE's parameters still undercuts FLARE; our parameters halve it again,
    # the fixed integer grid quarters that, and the noise-tied grid halves it once more
    real, flare_params = result["ours_real"], result["ours_flare_params"]
    sizes = [r["bytes_per_param"] for r in (ours, fixed, real, flare_params, flare)]
    assert sizes == sorted(sizes) and len(set(sizes)) == 5


def test_the_compact_format_reaches_plaintext_size_within_the_error_target():
    # 3 full ciphertexts of 8192 values (the count takes one): no padding, so the asymptotic size shows
    row = run_he_bench(params=3 * 8192 - 1, sites=3, contenders="ours_fixed,plaintext", repeats=1)["ours_fixed"]
    assert row["max_rel_error"] <= 1e-5
    assert row["ciphertext_bytes_per_param"] <= 4.0 and row["download_bytes_per_param"] <= 8.0
    assert row["bytes_per_param"] <= 4.0  # FLARE-serialised, layout included


def test_the_noise_tied_grid_reaches_two_bytes_per_param_up_and_four_down():
    # 2 full ciphertexts of 16 384 values: half plaintext's bytes, error a tenth of the noise std at most
    row = run_he_bench(params=2 * 16384 - 1, sites=3, contenders="ours_secagg", repeats=1)["ours_secagg"]
    assert row["max_error_noise_std"] <= 0.1
    assert row["ciphertext_bytes_per_param"] <= 1.9 and row["download_bytes_per_param"] <= 4.0
    assert row["bytes_per_param"] <= 2.0  # FLARE-serialised, layout and spec included


def test_contenders_can_be_picked_and_unknown_ones_are_refused():
    picked = run_he_bench(params=2_000, sites=3, contenders=["ours", "plaintext"], repeats=1)
    assert list(picked) == ["plaintext", "ours"]
    with pytest.raises(ValueError, match="unknown contender"):
        run_he_bench(params=2_000, sites=3, contenders="ours,nope", repeats=1)
    with pytest.raises(ValueError, match="fewer than 3"):
        run_he_bench(params=2_000, sites=2, contenders="ours", repeats=1)


def test_the_bench_model_has_exactly_the_asked_size_and_small_layers():
    for size in (1, 5_000, 20_000):
        model = bench_model(size)
        assert sum(v.size for v in model.values()) == size
        assert all(v.dtype == np.float32 for v in model.values())
    assert min(v.size for v in bench_model(20_000).values()) == 16


def test_the_table_has_a_row_per_contender(result):
    table = format_table(result)
    for name in result:
        assert name in table
    assert "ours vs FLARE HE" in table and "ours_real vs FLARE HE" in table and "err/σ" in table
