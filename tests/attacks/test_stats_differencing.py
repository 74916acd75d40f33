"""Attack (issue 12, item 7): undoing cohort_stats' small-cell suppression by differencing.

Three ways to get a withheld cell back, each run on real FLARE simulator runs (one shared workspace,
so every site keeps its folder, keys and logs between the jobs, as a deployed site does):

(a) **Residual rows.** site-3's CSV holds three rows whose label (2) is no declared group: they are
    in ``all`` only, so ``all`` minus ``malignant`` minus ``benign`` is their count and statistics.
(b) **Another site subset.** The same statistics over sites 1-3, then over sites 1-4 where site-4
    holds four malignant patients: the difference of the two releases is site-4's small cell.
(c) **Other bins.** The same statistics on 10 and then 20 bins: a 10-bin count minus the released
    half of it gives back the withheld other half.

Old code releases all of them. Fixed code treats the residual as a group (withheld when small, and
``all`` with it) and keeps a release log at every site, which refuses (b) and (c) before pass 2.
The unit-speed version of (a), on `stats.release` alone, is the first test.
"""

from __future__ import annotations

import numpy as np
import pytest

from clinfed.analytics import stats
from clinfed.data import breast_cancer as bc
from clinfed.fl.participant import write_site_policy
from clinfed.simulate import SimulationRequest, run_simulation

MIN_CELL = 10
RESIDUAL_ROWS = 3
SITE4_MALIGNANT = 4


def _masks(y: np.ndarray) -> dict:
    return {stats.ALL: np.ones(len(y), bool), "malignant": y == 1, "benign": y == 0}


def _plain_release(table, parts, labels, spec) -> dict:
    """Pass 1, pass 2 and the release over three sites' rows (plaintext sums: the arithmetic of the job)."""
    sites = list(zip(parts, labels, strict=True))
    sums = stats.unpack_sums(sum(stats.local_sums(table.x[p], _masks(lab), spec) for p, lab in sites), spec)
    devs = [stats.local_deviations(table.x[p], _masks(lab), sums.means(), spec) for p, lab in sites]
    return stats.release(sums, stats.unpack_deviations(sum(devs), spec), spec, min_cell=MIN_CELL)


def _residual_counts(statistics: dict) -> dict[str, int]:
    """What all − malignant − benign gives per feature, wherever all three are released."""
    out = {}
    groups = [statistics.get(g) or {} for g in ("all", "malignant", "benign")]
    for f, entry in groups[0].items():
        if f in groups[1] and f in groups[2]:
            out[f] = entry["count"] - groups[1][f]["count"] - groups[2][f]["count"]
    return out


def test_residual_rows_are_not_recoverable_as_all_minus_groups():
    table = bc.load_bundled()
    spec = stats.StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)))
    parts = [np.arange(0, 190), np.arange(190, 380), np.arange(380, 569)]
    labels = [table.y[p].astype(float) for p in parts]
    labels[2][:RESIDUAL_ROWS] = 2.0  # three patients of a third kind: no declared group holds them
    rel = _plain_release(table, parts, labels, spec)
    leaked = {f: n for f, n in _residual_counts(rel["statistics"]).items() if 0 < n < MIN_CELL}
    assert not leaked, f"all − groups reveals {len(leaked)} residual cell(s) of {RESIDUAL_ROWS} rows"
    assert rel["statistics"].get("malignant") and rel["statistics"].get("benign")  # the groups still go out


# --- the same attacks on real jobs ----------------------------------------------------------------------
def _write_csv(folder, table, rows, labels):
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join([*table.features, "target", "patient_id"])]
    for r, lab in zip(rows, labels, strict=True):
        lines.append(",".join([*(repr(float(v)) for v in table.x[r]), str(lab), f"p-{r}"]))
    (folder / "data.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three cohort_stats jobs on one federation: sites 1-3 (10 bins), sites 1-4, sites 1-3 on 20 bins."""
    root = tmp_path_factory.mktemp("differencing")
    table = bc.load_bundled()
    ws = root / "ws"
    malignant = np.flatnonzero(table.y == 1)
    site4 = malignant[:SITE4_MALIGNANT]
    rest = np.setdiff1d(np.arange(len(table.y)), site4)
    thirds = np.array_split(rest, 3)
    for i, rows in enumerate([*thirds, site4], start=1):
        labels = [int(table.y[r]) for r in rows]
        if i == 3:
            labels[:RESIDUAL_ROWS] = [2] * RESIDUAL_ROWS
        _write_csv(root / f"csv{i}", table, rows, labels)
        write_site_policy(ws / f"site-{i}", data_dir=str(root / f"csv{i}"))
    out = {}
    for name, sites, extra in [("first", 3, {}), ("subset", 4, {}), ("bins", 3, {"bins": 20})]:
        req = SimulationRequest(job="cohort_stats", sites=sites, out=root / name, workspace=ws, extra=extra)
        out[name] = run_simulation(req)
    return out


def test_a_residual_label_in_a_site_csv_is_not_recoverable_from_a_job(runs):
    first = runs["first"]
    assert first["final"]["status"] == "released"
    leaked = {f: n for f, n in _residual_counts(first["statistics"]).items() if 0 < n < MIN_CELL}
    assert not leaked, f"all − groups reveals the {RESIDUAL_ROWS} residual rows in {len(leaked)} feature(s)"


def test_b_another_site_subset_does_not_reveal_the_small_difference(runs):
    first, subset = runs["first"]["statistics"], runs["subset"]["statistics"]
    small = []
    for g in set(first) & set(subset):
        for f in set(first[g]) & set(subset[g]):
            diff = subset[g][f]["count"] - first[g][f]["count"]
            if 0 < abs(diff) < MIN_CELL:
                small.append((g, f, diff))
    assert not small, f"{len(small)} count(s) differ by a small cell between the two releases, e.g. {small[0]}"


def test_c_other_bins_do_not_give_back_withheld_cells(runs):
    coarse, fine = runs["first"]["statistics"], runs["bins"]["statistics"]
    derivable = 0
    for g in set(coarse) & set(fine):
        for f in set(coarse[g]) & set(fine[g]):
            hc, hf = coarse[g][f]["histogram"], fine[g][f]["histogram"]
            if not hc or not hf:
                continue
            for b, total in enumerate(hc["counts"]):
                left, right = hf["counts"][2 * b], hf["counts"][2 * b + 1]
                if total is not None and (left is None) != (right is None):
                    derivable += 1  # the hidden half = total − the shown half
                if total is None and left is not None and right is not None:
                    derivable += 1  # the hidden total = the two shown halves
    assert derivable == 0, f"{derivable} withheld cell(s) follow from the 10-bin and 20-bin releases together"


def test_the_refusals_name_the_release_log(runs):
    """Not an attack: what the fixed code says when it refuses (b) and (c)."""
    for name in ("subset", "bins"):
        summary = runs[name]
        if summary["final"]["status"] == "released":
            pytest.skip("old code: nothing refused")
        reasons = [e["reason"] for r in summary["rounds"] for e in r["sites"].values() if e["status"] != "ok"]
        assert reasons and all("release log" in r and "\n" not in r for r in reasons), reasons
