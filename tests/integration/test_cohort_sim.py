"""Claims of cohort_stats and psi_linkage, checked on real FLARE simulator runs (no mocks).

Seven runs (~25-35 s each on two cores): cohort_stats encrypted at the defaults, at min_cell=300,
with output DP over four sites, two of them bringing their own CSVs (one benign-only, one lacking a
column, so three remain: the contributor floor), psi_linkage and then cohort_stats on
the linked cohort (one shared workspace), psi_linkage on registries whose intersection is empty, and
cohort_stats with proportions and an incidence rate on a `clinfed data split` of whas500.
"""

import json

import numpy as np
import pytest

from clinfed.analytics import stats
from clinfed.analytics.psi import expected_intersection_size, patient_ids, registry_rows
from clinfed.data import breast_cancer as bc
from clinfed.fl.participant import write_site_policy
from clinfed.simulate import SimulationRequest, run_simulation

pytestmark = pytest.mark.slow
SITES = ["site-1", "site-2", "site-3"]


def _masks(y):
    return {stats.ALL: np.ones(len(y), bool), "malignant": y == 1, "benign": y == 0}


def _spec(table):
    return stats.StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)))


def _worst_relative_error(released: dict, x: np.ndarray, y: np.ndarray) -> float:
    """Counts must be exact; returns the worst relative error of mean and std over released cells."""
    table = bc.load_bundled()
    ref = stats.pooled_reference(x, _masks(y), _spec(table))
    worst = 0.0
    for group, feats in released.items():
        assert set(feats) == set(table.features), group
        for f, e in feats.items():
            r = ref[group][f]
            assert e["count"] == r["count"], (group, f)
            worst = max(worst, abs(e["mean"] - r["mean"]) / abs(r["mean"]), abs(e["std"] - r["std"]) / r["std"])
    return worst


def _write_csv(folder, table, rows, drop=None):
    folder.mkdir(parents=True, exist_ok=True)
    cols = [f for f in table.features if f != drop]
    lines = [",".join([*cols, "target", "patient_id"])]
    for r in rows:
        values = [repr(float(v)) for f, v in zip(table.features, table.x[r], strict=True) if f != drop]
        lines.append(",".join([*values, str(int(table.y[r])), f"csv-{r}"]))
    (folder / "data.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def encrypted_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort_enc")
    return out, run_simulation(SimulationRequest(job="cohort_stats", sites=3, out=out))


def test_encrypted_statistics_equal_the_pooled_ones_over_all_569_rows(encrypted_run):
    out, summary = encrypted_run
    assert json.loads((out / "summary.json").read_text()) == summary
    # two rounds of the generic sums job: pass-1 sums (then the means back), deviations (then the release)
    assert summary["encrypted"] is True and summary["rounds_completed"] == 2
    assert [r["phase"] for r in summary["rounds"]] == ["sums", "deviations"]
    assert summary["final"]["status"] == "released"
    assert all(e["status"] == "ok" for r in summary["rounds"] for e in r["sites"].values())
    table = bc.load_bundled()
    released = summary["statistics"]
    assert {g: released[g]["mean radius"]["count"] for g in released} == {"all": 569, "malignant": 212, "benign": 357}
    assert _worst_relative_error(released, table.x, table.y) < 1e-6


def test_encrypted_uploads_are_a_few_ciphertexts_and_the_server_holds_no_secret_key(encrypted_run):
    out, summary = encrypted_run
    for e in summary["rounds"][0]["sites"].values():  # 19 084 slots with the fine quantile histograms
        assert 10 * 16_000 < e["bytes_sent"] < 10 * 40_000  # ten seeded CKKS ciphertexts of 2 048 slots
    for e in summary["rounds"][1]["sites"].values():
        assert 16_000 < e["bytes_sent"] < 40_000  # one ciphertext
    server_files = [p for p in (out / "workspace" / "server").rglob("*") if p.is_file()]
    assert "client_context.tenseal" not in {p.name for p in server_files}


def test_released_quantiles_are_within_1_percent_of_range_of_the_pooled_np_quantile(encrypted_run):
    """median, q25 and q75 of every released group and feature, against np.quantile on all 569 rows;
    a null one only where its rank's cell depends on how withheld cells split (stats.quantile_cells)."""
    _, summary = encrypted_run
    table = bc.load_bundled()
    spec = _spec(table)
    ref = stats.pooled_reference(table.x, _masks(table.y), spec)
    worst, shown = 0.0, 0
    for group, feats in summary["statistics"].items():
        for f, e in feats.items():
            j = spec.features.index(f)
            hidden = {b for b, c in enumerate(e["histogram"]["counts"]) if c is None}
            for key, q in stats.QUANTILES.items():
                if e[key] is None:
                    assert hidden, (group, f, key)
                    counts = np.array([c or 0 for c in e["histogram"]["counts"]])
                    counts[min(hidden)] += e["count"] - counts.sum()  # any split: the decision is the same
                    assert not stats.quantile_cells(counts, hidden, q), (group, f, key)
                    continue
                shown += 1
                worst = max(worst, abs(e[key] - ref[group][f][key]) / (spec.hi[j] - spec.lo[j]))
    assert worst < 0.01
    assert shown > 3 * 30 * 3 / 2
    assert "fine histogram" in json.dumps(summary)  # how the quantiles were made is stated, not the counts
    assert "fine_hist" not in json.dumps(summary)


def test_released_histograms_hide_every_cell_below_min_cell(encrypted_run):
    _, summary = encrypted_run
    hidden = 0
    for feats in summary["statistics"].values():
        for e in feats.values():
            counts = e["histogram"]["counts"]
            assert all(c is None or c >= 10 for c in counts)
            hidden += counts.count(None)
    assert hidden == summary["suppression"]["cells_withheld_total"] > 0
    assert summary["dp"] is None


def test_audit_logs_of_all_participants_verify_and_cross_check(encrypted_run):
    from clinfed.audit import verify

    out, _ = encrypted_run
    report = verify(out / "workspace")
    assert report.ok, report.problems


def test_min_cell_300_withholds_malignant_and_releases_benign(tmp_path):
    summary = run_simulation(SimulationRequest(job="cohort_stats", sites=3, out=tmp_path, min_cell=300))
    assert set(summary["statistics"]) == {"benign"}
    withheld = summary["suppression"]["groups_withheld"]
    assert "fewer than 300 rows" in withheld["malignant"]
    assert "complementary" in withheld["all"]  # all − benign would give malignant back
    assert summary["statistics"]["benign"]["mean radius"]["count"] == 357
    assert summary["final"]["metrics"]["groups_released"] == 1


def test_dp_run_with_a_benign_only_site_and_a_site_lacking_a_column(tmp_path):
    """site-2 brings a CSV of benign rows only (an empty malignant group); site-3's CSV lacks a feature
    column: site-3 fails admission with a one-line reason, the release covers sites 1, 2 and 4.
    Output DP (ε=10, Laplace: a site's default max_job_epsilon) on three features: noisy, but close to
    the truth, and charged to the ledgers of the three contributing sites (not to site-3's)."""
    table = bc.load_bundled()
    features = ["mean radius", "mean area", "worst concavity"]
    ws = tmp_path / "ws"
    benign = np.flatnonzero(table.y == 0)[:120]
    _write_csv(tmp_path / "site2", table, benign)
    _write_csv(tmp_path / "site3", table, range(50), drop="mean radius")
    write_site_policy(ws / "site-2", data_dir=str(tmp_path / "site2"))
    write_site_policy(ws / "site-3", data_dir=str(tmp_path / "site3"))
    req = SimulationRequest(
        job="cohort_stats",
        sites=4,
        out=tmp_path / "out",
        workspace=ws,
        epsilon=10.0,
        extra={"features": features},
    )
    summary = run_simulation(req)
    assert summary["encrypted"] is True
    assert summary["admission"]["site-3"]["status"] == "failed" and "site-3" not in summary["rounds"][0]["sites"]
    reason = summary["admission"]["site-3"]["reason"]
    assert reason.startswith("site-3: ") and reason.endswith("lacks column 'mean radius'") and "\n" not in reason
    assert summary["final"]["per_site"] == {
        "site-1": {"contributed": True},
        "site-2": {"contributed": True},
        "site-3": {"contributed": False},
        "site-4": {"contributed": True},
    }
    dp = summary["dp"]
    assert dp["mechanism"] == "laplace" and dp["epsilon"] == 10.0
    assert dp["noise_scale"]["count"] == pytest.approx(2 / (10.0 * 0.1))
    assert summary["rounds"][0]["sites"][summary["final"]["release_site"]]["epsilon"] == 10.0
    split = bc.dirichlet_split(table.y, 4)
    rows = np.concatenate([split[0], benign, split[3]])
    charged = summary["privacy"]["epsilon_charged"]
    assert charged == {"site-1": 10.0, "site-2": 10.0, "site-3": 0.0, "site-4": 10.0}
    cols = [table.features.index(f) for f in features]
    truth = stats.pooled_reference(
        table.x[np.ix_(rows, cols)], _masks(table.y[rows]), stats.StatsSpec(features, [(0, 1)] * 3)
    )
    assert set(summary["statistics"]) == {"all", "malignant", "benign"}
    for group, feats in summary["statistics"].items():
        assert set(feats) == set(features)
        for f, e in feats.items():
            n = truth[group][f]["count"]
            assert abs(e["count"] - n) <= 15 * dp["noise_scale"]["count"], (group, f)
            assert abs(e["mean"] - truth[group][f]["mean"]) <= 15 * dp["noise_scale"]["sum"][f] / n, (group, f)


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    root = tmp_path_factory.mktemp("psi")
    psi = run_simulation(SimulationRequest(job="psi_linkage", sites=3, out=root / "psi", workspace=root / "ws"))
    cohort = run_simulation(
        SimulationRequest(
            job="cohort_stats", sites=3, out=root / "cohort", workspace=root / "ws", extra={"cohort": "intersect"}
        )
    )
    return root, psi, cohort


def test_psi_every_site_finds_the_same_intersection_of_the_expected_size(linked):
    root, psi, _ = linked
    expected = expected_intersection_size(3)
    assert psi["psi"] == {
        "intersection_size": expected,
        "expected_intersection_size": expected,
        "per_site": dict.fromkeys(SITES, expected),
    }, psi["final"]["reason"]
    core = set.intersection(*(set(patient_ids(registry_rows(i, 3))) for i in range(3)))
    for site in SITES:
        folder = root / "ws" / site / "local" / "psi"
        assert set((folder / "intersection.txt").read_text().split()) == core
        assert (folder / "intersection.txt").stat().st_mode & 0o077 == 0
        assert not list(folder.glob("*.pending"))
    server_text = " ".join(p.read_text(errors="ignore") for p in (root / "ws" / "server").rglob("*") if p.is_file())
    assert "bc-0200" not in server_text and "bc-0200" not in json.dumps(psi)


def test_cohort_stats_on_the_linked_cohort_counts_only_linked_rows(linked):
    _, _, cohort = linked
    table = bc.load_bundled()
    assert cohort["cohort"] == "intersect" and cohort["final"]["status"] == "released", cohort["final"]["reason"]
    core = np.asarray(registry_rows(2, 3))[: expected_intersection_size(3)]  # the last site's range starts at the core
    rows = np.tile(core, 3)  # every site holds its own record of each linked patient
    assert cohort["statistics"]["all"]["mean radius"]["count"] == 3 * 193
    assert _worst_relative_error(cohort["statistics"], table.x[rows], table.y[rows]) < 1e-6


def test_psi_reports_an_empty_intersection_as_zero_not_as_a_failure(tmp_path):
    """FLARE's DhPSITaskHandler treats an empty pairwise result as "none yet" and goes on with the
    site's full set (its own check then fails); an empty pairwise intersection must end as 0."""
    ws = tmp_path / "ws"
    for i, ids in enumerate([["a", "b"], ["c", "d", "e"], ["c", "d", "x", "y"]], start=1):
        folder = tmp_path / f"csv{i}"
        folder.mkdir()
        (folder / "data.csv").write_text("patient_id,age\n" + "".join(f"{p},50\n" for p in ids))
        write_site_policy(ws / f"site-{i}", data_dir=str(folder))
    summary = run_simulation(SimulationRequest(job="psi_linkage", sites=3, out=tmp_path / "out", workspace=ws))
    assert summary["psi"] == {
        "intersection_size": 0,
        "expected_intersection_size": None,  # own CSVs: no known truth
        "per_site": dict.fromkeys(SITES, 0),
    }
    for site in SITES:
        assert (ws / site / "local" / "psi" / "intersection.txt").read_text() == ""


def test_clinical_split_proportions_and_rate_equal_the_pooled_table(tmp_path, capsys):
    """`clinfed data split` of whas500 to 3 SQLite sites, then `clinfed simulate cohort_stats` with
    features, a group, proportions and an incidence rate (encrypted): every released count equals the
    pooled table's, proportions and rates to 7 significant digits, CIs as statsmodels gives them."""
    from statsmodels.stats.proportion import proportion_confint
    from statsmodels.stats.rates import confint_poisson

    from clinfed.cli import main
    from clinfed.data.clinical import load_dataset

    data, out = tmp_path / "whas500", tmp_path / "out"
    assert main(["data", "split", "--dataset", "whas500", "--sites", "3", "--out", str(data)]) == 0
    argv = ["simulate", "cohort_stats", "--data-dir", str(data), "--features", "age,bmi", "--group", "gender"]
    argv += ["--proportions", "chf,mitype", "--rate", "event:time", "--rate-per", "1000", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["encrypted"] is True and summary["final"]["status"] == "released"
    assert all(e["status"] == "ok" for r in summary["rounds"] for e in r["sites"].values())
    frame = load_dataset("whas500")
    released = summary["statistics"]
    assert set(released) == {"all", "0", "1"}
    for group, entry in released.items():
        rows = frame if group == "all" else frame[frame["gender"] == group]
        assert entry["age"]["count"] == len(rows)
        assert entry["age"]["mean"] == pytest.approx(rows["age"].mean(), rel=1e-6)
        for col in ("chf", "mitype"):
            for level, e in entry["proportions"][col].items():
                k, n = int((rows[col] == level).sum()), int(rows[col].notna().sum())
                assert e["count"] == k, (group, col, level)
                assert e["proportion"] == pytest.approx(k / n, rel=5e-7)
                assert [e["ci_low"], e["ci_high"]] == pytest.approx(proportion_confint(k, n, method="beta"), rel=5e-7)
        rate, events, pt = entry["rate"], int(rows["event"].sum()), float(rows["time"].sum())
        assert (rate["n"], rate["events"], rate["person_time"]) == (len(rows), events, pt)
        assert rate["rate"] == pytest.approx(events / pt * 1000, rel=5e-7) and rate["per"] == 1000
        ci = confint_poisson(events, pt / 1000, method="exact-c")
        assert [rate["ci_low"], rate["ci_high"]] == pytest.approx(ci, rel=5e-7)
    assert summary["suppression"]["rates_withheld"] == {}
