"""Claim: a long run does not leak: 30 encrypted rounds, every process (server and sites) grows by at
most 0.25 MB a round (least-squares slope of RSS from round 5 on), and the largest process's RSS at
round 30 is within 20 % of round 5 (the soak benchmark's own measurement, on FLARE's simulator)."""

import pytest

from clinfed.bench.soak import run_soak

pytestmark = [pytest.mark.slow, pytest.mark.bench]  # 92 s: CLINFED_BENCH=1 runs it


def test_rss_is_flat_over_30_rounds(tmp_path):
    result = run_soak(rounds=30, sites=3, out=tmp_path)
    assert result["rounds_completed"] == 30
    assert len(result["rss_mb"]) == 30
    assert all(rss > 0 for series in result["rss_mb_by_process"].values() for rss in series)
    assert set(result["slope_mb_per_round"]) == set(result["rss_mb_by_process"])
    assert result["max_slope_mb_per_round"] <= 0.25, result["slope_mb_per_round"]
    assert abs(result["growth_round5_to_last"]) <= 0.20, result["rss_mb"]
