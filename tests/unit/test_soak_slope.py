"""Claim: the soak's growth figure is the least-squares slope of RSS per round from round 5 on (warm-up
rounds 1-4 and missing readings left out), and the end-of-round release frees a round's cyclic garbage."""

import gc
import math
import weakref

import pytest

from clinfed.bench.soak import format_table, slope_mb_per_round
from clinfed.sysinfo import release_free_memory


def test_slope_is_the_least_squares_fit_from_round_5():
    assert slope_mb_per_round([400.0 + 0.5 * r for r in range(1, 31)]) == pytest.approx(0.5)
    # a warm-up jump in rounds 1-4 does not count; a flat tail is a zero slope
    assert slope_mb_per_round([100.0, 200.0, 300.0, 400.0] + [500.0] * 26) == pytest.approx(0.0)
    # noise around a line: the fit, not last/first
    noisy = [500.0 + 0.2 * r + (1.0 if r % 2 else -1.0) for r in range(1, 31)]
    assert slope_mb_per_round(noisy) == pytest.approx(0.2, abs=0.02)
    assert noisy[-1] - noisy[4] != pytest.approx(0.2 * 25)


def test_slope_skips_missing_readings_and_needs_two():
    rss = [1.0] * 4 + [10.0, math.nan, 12.0, 13.0]
    assert slope_mb_per_round(rss) == pytest.approx(1.0)
    assert math.isnan(slope_mb_per_round([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert math.isnan(slope_mb_per_round([]))


def test_table_states_the_slope_of_every_process():
    series = {"server": [90.0 + 0.1 * r for r in range(30)], "site-1": [480.0 + 1.0 * r for r in range(30)]}
    result = {
        "rounds": 30,
        "seconds": 1.0,
        "final_auc": 0.99,
        "largest_process": "site-1",
        "rss_mb_by_process": series,
        "growth_round5_to_last": 0.05,
        "slope_from_round": 5,
        "slope_mb_per_round": {k: slope_mb_per_round(v) for k, v in series.items()},
        "largest_process_slope_mb_per_round": 1.0,
        "max_slope_mb_per_round": 1.0,
    }
    table = format_table(result)
    assert "+0.100" in table and "+1.000" in table and "MB/round" in table


def test_release_frees_a_rounds_cyclic_garbage():
    class Message:
        pass

    gc.disable()  # only the release may collect here
    try:
        msg = Message()
        msg.self_ref, msg.payload = msg, bytearray(1 << 20)
        alive = weakref.ref(msg)
        del msg
        assert alive() is not None  # a cycle outlives its last name until the collector runs
        release_free_memory()
        assert alive() is None
    finally:
        gc.enable()
