"""Claims of clinfed.analytics.stats (pure math) and of the PSI demo's identifiers, checked without FLARE."""

import json
import math

import numpy as np
import pytest

from clinfed.analytics import stats
from clinfed.analytics.cohort_data import group_masks, read_cohort_csv
from clinfed.analytics.psi import (
    expected_intersection_size,
    patient_ids,
    read_registry_csv,
    registry_rows,
    site_index,
)
from clinfed.analytics.stats import ALL, DPConfig, StatsSpec
from clinfed.data import breast_cancer as bc


@pytest.fixture(scope="module")
def table():
    return bc.load_bundled()


@pytest.fixture(scope="module")
def spec(table):
    return StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)))


def _masks(y):
    return {ALL: np.ones(len(y), bool), "malignant": y == 1, "benign": y == 0}


def _federate(table, spec, parts, ctx_pair=None):
    """Pass 1 and pass 2 over the given row sets, summed in plaintext or under CKKS as the job does."""
    if ctx_pair is None:
        s = sum(stats.local_sums(table.x[p], _masks(table.y[p]), spec) for p in parts)
        sums = stats.unpack_sums(s, spec)
        d = sum(stats.local_deviations(table.x[p], _masks(table.y[p]), sums.means(), spec) for p in parts)
        return sums, stats.unpack_deviations(d, spec)
    from clinfed.he.aggregation import EncryptedSum
    from clinfed.he.ckks import decrypt_vector, encrypt_vector

    secret, public = ctx_pair
    acc = EncryptedSum(public, size=spec.pass1_size)
    for i, p in enumerate(parts):
        acc.add(
            f"site-{i + 1}",
            encrypt_vector(secret, stats.local_sums(table.x[p], _masks(table.y[p]), spec)),
            1,
            acc.fingerprint,
        )
    sums = stats.unpack_sums(decrypt_vector(secret, acc.result()[0], spec.pass1_size), spec)
    acc2 = EncryptedSum(public, size=spec.pass2_size)
    for i, p in enumerate(parts):
        vec = stats.local_deviations(table.x[p], _masks(table.y[p]), sums.means(), spec)
        acc2.add(f"site-{i + 1}", encrypt_vector(secret, vec), 1, acc2.fingerprint)
    return sums, stats.unpack_deviations(decrypt_vector(secret, acc2.result()[0], spec.pass2_size), spec)


def _worst_relative_error(release, reference):
    worst = 0.0
    for g, feats in release["statistics"].items():
        for f, e in feats.items():
            r = reference[g][f]
            assert e["count"] == r["count"], (g, f)
            worst = max(worst, abs(e["mean"] - r["mean"]) / abs(r["mean"]), abs(e["std"] - r["std"]) / r["std"])
    return worst


# --- layout and packing --------------------------------------------------------------------------------------
def test_one_ciphertext_carries_a_sites_whole_pass1_vector(spec):
    from clinfed.he.params import DEFAULT_PARAMS, ciphertexts_for

    assert spec.pass1_size == 3 * (1 + 2 * 30 + 30 * 10) + 1 == 1084  # + the contributor slot
    assert ciphertexts_for(DEFAULT_PARAMS, spec.pass1_size) == 1
    assert ciphertexts_for(DEFAULT_PARAMS, spec.pass2_size) == 1


def test_public_bounds_contain_every_bundled_value_and_scaled_sums_stay_far_below_ckks_limit(table, spec):
    from clinfed.he.params import DEFAULT_PARAMS, max_abs_value

    assert np.all(table.x >= spec.lo) and np.all(table.x <= spec.hi)
    vec = stats.local_sums(table.x, _masks(table.y), spec)  # all 569 rows at one site: the worst case
    assert np.abs(vec).max() <= len(table.y) < max_abs_value(DEFAULT_PARAMS) / 1000


def test_nice_bounds_round_outward():
    assert stats.nice_bounds(6.981, 28.11) == (6.9, 29.0)
    assert stats.nice_bounds(0.0, 0.4268) == (0.0, 0.43)
    assert stats.nice_bounds(143.5, 2501.0) == (140.0, 2600.0)


def test_spec_refuses_what_would_misalign_slots():
    with pytest.raises(ValueError, match="start with 'all'"):
        StatsSpec(("a",), ((0, 1),), groups=("x", ALL))
    with pytest.raises(ValueError, match="lo < hi"):
        StatsSpec(("a",), ((1, 1),))
    with pytest.raises(ValueError, match="2 bounds for 1 features"):
        StatsSpec(("a",), ((0, 1), (0, 2)))


def test_spec_round_trips_through_job_config_json(spec):
    again = StatsSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.digest() == spec.digest()
    from clinfed.analytics.registry import make_method

    def digest(**extra):
        groups = {"malignant": 1, "benign": 0}
        config = {"method": "cohort", "spec": spec.to_dict(), "group_values": groups, "dp": None, **extra}
        return make_method(json.loads(json.dumps(config))).digest()

    assert digest() != digest(dp={"epsilon": 1.0}) != digest(cohort="intersect")


def test_histogram_bins_are_fixed_and_out_of_range_values_land_in_edge_bins():
    edges = np.linspace(0.0, 10.0, 6)
    counts = stats.histogram_counts(np.array([-5.0, 0.0, 1.9, 2.0, 9.99, 10.0, 50.0, np.nan]), edges)
    assert counts.tolist() == [3, 1, 0, 0, 3]


# --- the two passes ------------------------------------------------------------------------------------------
def test_federated_two_pass_equals_pooled_statistics_under_ckks(table, spec):
    from clinfed.he.context import create_context_pair

    parts = bc.dirichlet_split(table.y, 3)
    sums, m2 = _federate(table, spec, parts, create_context_pair())
    rel = stats.release(sums, m2, spec, min_cell=10)
    assert sums.rows.tolist() == [569, 212, 357]
    assert _worst_relative_error(rel, stats.pooled_reference(table.x, _masks(table.y), spec)) < 1e-6


def test_two_pass_variance_survives_mean_far_above_std(spec):
    """Σx² − n·mean² loses every digit here; Σ(x − mean)² does not."""
    rng = np.random.default_rng(0)
    one = StatsSpec(("v",), ((0.0, 2e6),), groups=(ALL,))
    x = (1e6 + rng.normal(0, 0.01, size=(1000, 1))).astype(np.float64)
    halves = [(x[:400], {ALL: np.ones(400, bool)}), (x[400:], {ALL: np.ones(600, bool)})]
    sums = stats.unpack_sums(sum(stats.local_sums(h, m, one) for h, m in halves), one)
    m2 = stats.unpack_deviations(sum(stats.local_deviations(h, m, sums.means(), one) for h, m in halves), one)
    std = math.sqrt(m2[0, 0] / 999)
    assert std == pytest.approx(x.std(ddof=1), rel=1e-6)


def test_site_with_an_empty_group_adds_zeros_and_changes_nothing(table, spec):
    benign_only = np.flatnonzero(table.y == 0)[:100]
    rest = np.flatnonzero(table.y == 1)
    vec = stats.local_sums(table.x[benign_only], _masks(table.y[benign_only]), spec)
    mal = spec.groups.index("malignant")
    assert not vec[:-1].reshape(spec.n_groups, spec.block)[mal].any()
    sums, m2 = _federate(table, spec, [benign_only, rest[:100], rest[100:]])
    both = np.concatenate([benign_only, rest])
    rel = stats.release(sums, m2, spec, min_cell=10)
    assert _worst_relative_error(rel, stats.pooled_reference(table.x[both], _masks(table.y[both]), spec)) < 1e-6


def test_missing_values_are_skipped_per_feature(spec):
    x = np.full((30, spec.n_features), 1.0)
    x[:5, 0] = np.nan
    sums = stats.unpack_sums(stats.local_sums(x, {g: np.ones(30, bool) for g in spec.groups}, spec), spec)
    assert sums.rows[0] == 30 and sums.count[0, 0] == 25 and sums.count[0, 1] == 30
    assert sums.hist[0, 0].sum() == 25


def test_wrapped_or_corrupted_counts_are_refused(spec):
    vec = np.zeros(spec.pass1_size)
    vec[0] = 12.4
    with pytest.raises(ValueError, match="not non-negative whole numbers"):
        stats.unpack_sums(vec, spec)


# --- suppression ------------------------------------------------------------------------------------------
def test_min_cell_300_withholds_malignant_and_by_complement_all_but_releases_benign(table, spec):
    sums, m2 = _federate(table, spec, bc.dirichlet_split(table.y, 3))
    rel = stats.release(sums, m2, spec, min_cell=300)
    assert set(rel["statistics"]) == {"benign"}
    assert set(rel["suppression"]["groups_withheld"]) == {"malignant", "all"}
    assert rel["statistics"]["benign"]["mean radius"]["count"] == 357
    assert "212" not in json.dumps(rel["suppression"], ensure_ascii=False)  # reasons name rules, not counts


def test_small_cells_are_withheld_and_no_withheld_cell_is_recoverable_by_subtraction(table, spec):
    sums, m2 = _federate(table, spec, bc.dirichlet_split(table.y, 3))
    rel = stats.release(sums, m2, spec, min_cell=10)
    assert rel["suppression"]["cells_withheld_total"] > 0
    for f in spec.features:
        rows = {g: rel["statistics"][g][f]["histogram"]["counts"] for g in spec.groups}
        for g, counts in rows.items():
            assert all(c is None or c >= 10 for c in counts), (g, f)
            hidden = [b for b, c in enumerate(counts) if c is None]
            assert len(hidden) != 1, (g, f)  # row total − shown bins would give it back
        for b in range(spec.bins):  # all[b] = malignant[b] + benign[b]
            hidden = [g for g in spec.groups if rows[g][b] is None]
            assert len(hidden) != 1, (f, b)


def test_feature_with_few_values_is_withheld_by_flares_min_count_cleanser(spec):
    rows = np.array([40, 20, 20])
    counts = np.tile(rows[:, None], (1, spec.n_features))
    counts[1, 3] = 4  # malignant has only 4 values of feature 3
    hist = np.zeros((3, spec.n_features, spec.bins), dtype=int)
    hist[..., 0] = counts
    sup = stats.suppress(spec, rows, counts, hist, min_cell=5, max_bins_percent=None)
    f3 = spec.features[3]
    assert f3 in sup.features["malignant"]
    assert "complementary" in sup.features[ALL][f3]  # all − benign would reveal it
    assert f3 not in sup.features["benign"]


def test_histogram_with_too_many_bins_for_its_count_is_withheld(spec):
    rows = np.array([120, 60, 60])
    counts = np.tile(rows[:, None], (1, spec.n_features))
    hist = np.zeros((3, spec.n_features, spec.bins), dtype=int)
    hist[..., 0] = counts
    sup = stats.suppress(spec, rows, counts, hist, min_cell=5, max_bins_percent=10.0)
    assert set(sup.histograms["malignant"]) == set(spec.features)  # 10 bins ≥ 10 % of 60
    assert set(sup.histograms[ALL]) == set(spec.features)  # complementary


# --- output DP ---------------------------------------------------------------------------------------------
def test_laplace_noise_scales_follow_the_documented_sensitivities(spec):
    plan = stats.noise_plan(spec, DPConfig(epsilon=2.0))
    assert plan.count == pytest.approx(2 * 1 / (2.0 * 0.1))  # 2 groups per record, 1 count each
    assert plan.histogram == pytest.approx(2 * 30 / (2.0 * 0.3))
    j = 0
    assert plan.sum[j] == pytest.approx((spec.hi[j] - spec.lo[j]) / 2 * 2 * 30 / (2.0 * 0.3))
    assert plan.m2[j] == pytest.approx((spec.hi[j] - spec.lo[j]) ** 2 * 2 * 30 / (2.0 * 0.3))


def test_gaussian_families_compose_to_the_one_spend_the_ledger_charges():
    """The four families' multipliers z_k = z/√share_k are one RDP Gaussian release at z; its ε is the one asked."""
    from opacus.accountants import RDPAccountant

    from clinfed.analytics import output_dp

    dp = DPConfig(epsilon=1.0, mechanism="gaussian", delta=1e-5)
    z = output_dp.noise_multiplier(dp.epsilon, dp.delta)
    parts = output_dp.family_multipliers(z, dp.split)
    assert sum(v**-2 for v in parts.values()) == pytest.approx(z**-2, rel=1e-12)
    accountant = RDPAccountant()
    accountant.history = [(z, 1.0, 1)]
    assert accountant.get_epsilon(1e-5) == pytest.approx(1.0, abs=0.01)  # Opacus' calibration tolerance


def test_dp_release_reports_mechanism_and_scales_and_noisy_values_stay_plausible(table, spec):
    sums, m2 = _federate(table, spec, bc.dirichlet_split(table.y, 3))
    rel = stats.release(sums, m2, spec, min_cell=10, dp=DPConfig(epsilon=50.0), rng=np.random.default_rng(1))
    dp = rel["dp"]
    assert dp["mechanism"] == "laplace" and dp["epsilon"] == 50.0
    assert set(dp["noise_scale"]) == {"count", "histogram", "sum", "m2"}
    e = rel["statistics"][ALL]["mean radius"]
    assert abs(e["count"] - 569) < 10 * dp["noise_scale"]["count"]
    assert spec.lo[0] <= e["mean"] <= spec.hi[0]
    assert e["mean"] == pytest.approx(14.127, abs=10 * dp["noise_scale"]["sum"]["mean radius"] / 569)


def test_dp_config_refuses_nonsense():
    with pytest.raises(ValueError, match="positive"):
        DPConfig(epsilon=0.0)
    with pytest.raises(ValueError, match="delta"):
        DPConfig(epsilon=1.0, mechanism="gaussian")
    with pytest.raises(ValueError, match="mechanism"):
        DPConfig(epsilon=1.0, mechanism="exponential")


# --- a site's CSV ------------------------------------------------------------------------------------------
def _write_csv(path, header, rows):
    path.mkdir(parents=True, exist_ok=True)
    lines = [",".join(header)] + [",".join(str(v) for v in r) for r in rows]
    (path / "data.csv").write_text("\n".join(lines) + "\n")


def test_csv_lacking_a_column_names_the_site_and_the_column(tmp_path, table):
    header = [f for f in table.features if f != "mean texture"] + ["target"]
    _write_csv(tmp_path / "s3", header, [[1.0] * (len(header) - 1) + [0]])
    with pytest.raises(ValueError, match=r"^site-3: .*data.csv lacks column 'mean texture'$"):
        read_cohort_csv("site-3", tmp_path / "s3", list(table.features), "target")


def test_csv_groups_and_missing_cells(tmp_path, spec):
    header = [*spec.features, "target"]
    rows = [[1.0] * spec.n_features + ["1"], ["NA"] + [2.0] * (spec.n_features - 1) + ["0.0"]]
    _write_csv(tmp_path / "s", header, rows)
    x, labels, ids = read_cohort_csv("site-1", tmp_path / "s", list(spec.features), "target")
    assert math.isnan(x[1, 0]) and ids is None
    masks = group_masks(labels, spec, {"malignant": 1, "benign": 0})
    assert masks["malignant"].tolist() == [True, False] and masks["benign"].tolist() == [False, True]


# --- PSI demo identifiers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sites", [1, 2, 3, 5, 10])
def test_registry_ranges_share_exactly_the_expected_core(sites):
    sets = [set(patient_ids(registry_rows(i, sites))) for i in range(sites)]
    common = set.intersection(*sets)
    assert len(common) == expected_intersection_size(sites) > 0
    if sites > 2:  # the forward pass really narrows: neighbours share more than everyone does
        assert len(sets[0] & sets[1]) > len(common)


def test_three_site_demo_numbers():
    assert expected_intersection_size(3) == 193
    assert [len(registry_rows(i, 3)) for i in range(3)] == [381, 381, 381]
    assert site_index("site-3") == 2 and site_index("hospital") is None


def test_registry_csv_refuses_duplicate_or_missing_ids(tmp_path):
    _write_csv(tmp_path / "a", ["patient_id", "x"], [["p1", 1], ["p1", 2]])
    with pytest.raises(ValueError, match=r"site-2: .*1 duplicate 'patient_id'"):
        read_registry_csv("site-2", tmp_path / "a", "patient_id")
    _write_csv(tmp_path / "b", ["mrn", "x"], [["p1", 1]])
    with pytest.raises(ValueError, match=r"site-2: .*lacks column 'patient_id'"):
        read_registry_csv("site-2", tmp_path / "b", "patient_id")


# --- issue 12: contributor floor, residual group, release log, rounding ---------------------------------------
def test_the_contributor_slot_counts_the_sites_in_a_sum(table, spec):
    parts = bc.dirichlet_split(table.y, 3)
    vecs = [stats.local_sums(table.x[p], _masks(table.y[p]), spec) for p in parts]
    assert stats.unpack_sums(sum(vecs), spec).contributors == 3
    assert stats.contributors(sum(vecs[:2])) == 2
    with pytest.raises(ValueError, match="at least 3"):
        stats.check_contributors(2)


def test_a_large_residual_is_protected_like_a_group(table, spec):
    """Rows in no declared group (here 120 relabelled rows) are in `all` only: all − groups is their
    histogram, so its small cells must not be derivable from the released ones."""
    parts = bc.dirichlet_split(table.y, 3)
    labels = [table.y[p].astype(float) for p in parts]
    labels[0][:120] = 2.0
    masks = [_masks(lab) for lab in labels]
    sums = stats.unpack_sums(
        sum(stats.local_sums(table.x[p], m, spec) for p, m in zip(parts, masks, strict=True)), spec
    )
    devs = sum(stats.local_deviations(table.x[p], m, sums.means(), spec) for p, m in zip(parts, masks, strict=True))
    rel = stats.release(sums, stats.unpack_deviations(devs, spec), spec, min_cell=10)
    assert set(rel["statistics"]) == {ALL, "malignant", "benign"}  # 120 rows: the residual may be derived
    assert stats.RESIDUAL not in rel["statistics"]
    derived = 0
    for f in spec.features:
        hists = [rel["statistics"][g][f]["histogram"] for g in spec.groups]
        if not all(hists):
            continue
        for b in range(spec.bins):
            cells = [h["counts"][b] for h in hists]
            if None not in cells:
                residual = cells[0] - cells[1] - cells[2]
                assert residual == 0 or residual >= 10, (f, b, residual)
                derived += 1
    assert derived > 0


def test_an_empty_residual_changes_nothing(table, spec):
    sums, _ = _federate(table, spec, bc.dirichlet_split(table.y, 3))
    plain = stats.suppress(spec, sums.rows, sums.count, sums.hist, 10, residual=False)
    with_residual = stats.suppress(spec, sums.rows, sums.count, sums.hist, 10)
    assert plain.as_dict(10.0) == with_residual.as_dict(10.0)


def test_released_means_are_rounded_to_seven_significant_digits(table, spec):
    sums, m2 = _federate(table, spec, bc.dirichlet_split(table.y, 3))
    rel = stats.release(sums, m2, spec, min_cell=10)
    e = rel["statistics"][ALL]["mean radius"]
    assert e["mean"] == float(f"{e['mean']:.6e}") and e["std"] == float(f"{e['std']:.6e}")
    assert rel["precision"]["mean_std_significant_digits"] == 7
    assert stats.round_release(14.127291739894552) == 14.12729 and stats.round_release(None) is None


def test_gaussian_release_is_charged_as_one_rdp_equivalent_gaussian():
    one = StatsSpec(("v",), ((0.0, 1.0),))
    dp = DPConfig(epsilon=1.0, mechanism="gaussian", delta=1e-5)
    z = stats.gaussian_noise_multiplier(one, dp)
    plan = stats.noise_plan(one, dp)  # one feature of unit range: each family's σ is its multiplier × √g
    g = math.sqrt(plan.group_factor)
    parts = [plan.count / g, plan.histogram / g, float(plan.sum[0]) / 0.5 / g, float(plan.m2[0]) / g]
    assert z == pytest.approx(sum(p**-2 for p in parts) ** -0.5, rel=1e-12) and z < min(parts)


# --- the release log ------------------------------------------------------------------------------------------
def _cells(spec, count=30, hidden=()):
    stats_ = {
        g: {
            f: {"count": count, "histogram": {"counts": [None if b in hidden else 3 for b in range(spec.bins)]}}
            for f in spec.features
        }
        for g in spec.groups
    }
    from clinfed.analytics.release_log import cells_of

    return cells_of(spec, stats_)


def test_release_log_admits_one_cohort_definition_and_grid(tmp_path):
    from clinfed.analytics.release_log import CohortDefinition, ReleaseLog, ReleaseRefused

    spec = StatsSpec(("a", "b"), ((0, 1), (0, 2)), bins=4)
    log = ReleaseLog(tmp_path, "site-1")
    base = CohortDefinition.of("all", ["site-2", "site-1", "site-3"], "target", {"m": 1, "b": 0}, "d1")
    log.admit(base, _cells(spec), job="j1", run="r1")
    log.admit(base, _cells(spec), job="j1", run="r2")  # the identical release again: harmless
    assert len(log.entries()) == 2
    others = {
        "cohort": CohortDefinition.of("intersect", ["site-1", "site-2", "site-3"], "target", {"m": 1, "b": 0}, "d1"),
        "sites": CohortDefinition.of("all", ["site-1", "site-2", "site-3", "site-4"], "target", {"m": 1, "b": 0}, "d1"),
        "groups": CohortDefinition.of("all", ["site-1", "site-2", "site-3"], "sex", {"f": "F", "m": "M"}, "d1"),
        "data": CohortDefinition.of("all", ["site-1", "site-2", "site-3"], "target", {"m": 1, "b": 0}, "d2"),
    }
    for definition in others.values():
        with pytest.raises(ReleaseRefused, match=r"^site-1: release log: job j1 .*another cohort definition"):
            log.admit(definition, _cells(spec), job="j2", run="r3")
    with pytest.raises(ReleaseRefused, match="another bin grid"):
        log.admit(base, _cells(StatsSpec(("a", "b"), ((0, 1), (0, 2)), bins=5)), job="j3", run="r4")
    with pytest.raises(ReleaseRefused, match="other cells"):
        log.admit(base, _cells(spec, hidden=(1, 2)), job="j4", run="r5")
    with pytest.raises(ReleaseRefused, match="other cells"):
        log.admit(base, _cells(spec, count=31), job="j5", run="r6")
    log.admit(base, _cells(StatsSpec(("c",), ((0, 1),), bins=4)), job="j6", run="r7")  # a new feature
    assert len(log.entries()) == 3
    assert (tmp_path / "local" / "release_log.json").stat().st_mode & 0o077 == 0


def test_a_gaussian_dp_release_is_reserved_in_the_site_ledger_before_pass_1(tmp_path, table):
    """The generic sums executor admits a cohort_stats job on its RDP spend, charges it once before its
    first vector leaves, and refuses a second such job (another run) that the budget cannot take."""
    from clinfed.analytics.registry import make_method
    from clinfed.analytics.sums_fl import SumsExecutor
    from clinfed.audit import AuditLog
    from clinfed.errors import SiteRefusal
    from clinfed.fl.participant import SitePolicy
    from clinfed.privacy.ledger import PrivacyLedger

    features = ["mean radius", "mean area"]
    cols = [table.features.index(f) for f in features]
    spec = StatsSpec(tuple(features), tuple(stats.reference_bounds(table.x[:, cols])))
    dp = {"epsilon": 2.0, "mechanism": "gaussian", "delta": 1e-5}
    method = {"method": "cohort", "spec": spec.to_dict(), "group_values": {"malignant": 1, "benign": 0}, "dp": dp}
    method["group_column"] = "target"

    def site(run: str) -> SumsExecutor:
        ex = SumsExecutor(method=method, num_sites=3, job_label="cohort_stats")
        ex.site, ex.root, ex.run_id = "site-2", tmp_path / "site-2", run
        (ex.root / "local").mkdir(parents=True, exist_ok=True)
        ex.policy, ex.audit, ex._m = SitePolicy(epsilon_budget=2.5), AuditLog(ex.root, ex.site), make_method(method)
        return ex

    first = site("job-g")
    assert first._admit()["status"] == "accepted"
    charged = first._charge()
    assert first._charge() == charged  # once per run, however many rounds
    ledger = PrivacyLedger(tmp_path / "site-2" / "local" / "privacy_ledger.json", "site-2")
    # the four families are one RDP release calibrated to ε 2 (`output_dp`): charged 1.99; a second would reach 2.93
    assert charged == pytest.approx(ledger.epsilon()) and ledger.epsilon() == pytest.approx(2.0, abs=0.02)
    assert [s.mechanism for s in ledger.spends] == ["gaussian"]
    with pytest.raises(SiteRefusal, match=r"^site-2: .*budget"):
        site("job-h")._admit()
    assert len(PrivacyLedger(tmp_path / "site-2" / "local" / "privacy_ledger.json", "site-2").spends) == 1


def _admit_in_process(args):
    from clinfed.analytics.release_log import CohortDefinition, ReleaseLog

    root, run = args
    spec = StatsSpec(("a", "b"), ((0, 1), (0, 2)), bins=4)
    definition = CohortDefinition.of("all", ["site-1", "site-2", "site-3"], "target", {"m": 1, "b": 0}, "d1")
    ReleaseLog(root, "site-1").admit(definition, _cells(spec), job="j", run=run)


def test_release_log_loses_no_entry_under_concurrent_processes(tmp_path):
    import multiprocessing

    from clinfed.analytics.release_log import ReleaseLog

    with multiprocessing.get_context("fork").Pool(4) as pool:
        pool.map(_admit_in_process, [(tmp_path, f"run-{i}") for i in range(12)])
    assert sorted(e["run"] for e in ReleaseLog(tmp_path, "site-1").entries()) == sorted(f"run-{i}" for i in range(12))


def test_the_feature_gate_keeps_what_flares_own_cleansers_keep():
    """`stats` restates FLARE's MinCountCleanser and HistogramBinsCleanser so it stays numpy only:
    on counts around both thresholds it keeps exactly the features and histograms they keep."""
    from nvflare.app_common.abstract.statistics_spec import Bin, Histogram, HistogramType
    from nvflare.app_common.app_constant import StatisticsConstants as StC
    from nvflare.app_common.statistics.histogram_bins_cleanser import HistogramBinsCleanser
    from nvflare.app_common.statistics.min_count_cleanser import MinCountCleanser

    spec = StatsSpec(tuple(f"f{i}" for i in range(40)), ((0, 1),) * 40, groups=(ALL, "a", "b"), bins=10)
    rng = np.random.default_rng(3)
    counts = {g: rng.integers(0, 250, spec.n_features) for g in spec.groups}
    counts["a"][:4] = [9, 10, 99, 105]  # at min_cell 10 and at round(count · 10 %) = 10 bins
    for min_cell, pct in [(10, 10.0), (1, 50.0), (30, None)]:
        fake_bins = [Bin(float(i), float(i + 1), 0) for i in range(spec.bins)]
        groups = list(spec.groups)
        flare = {
            StC.STATS_COUNT: {g: {f: int(c) for f, c in zip(spec.features, counts[g], strict=True)} for g in groups},
            StC.STATS_FAILURE_COUNT: {g: dict.fromkeys(spec.features, 0) for g in groups},
            StC.STATS_MEAN: {g: dict.fromkeys(spec.features, 0.0) for g in groups},
            StC.STATS_HISTOGRAM: {
                g: {f: Histogram(HistogramType.STANDARD, fake_bins, None) for f in spec.features} for g in groups
            },
        }
        flare, _ = MinCountCleanser(min_count=min_cell).apply(flare, "pooled")
        want_features = {g: set(flare[StC.STATS_MEAN].get(g, {})) for g in groups}
        if pct is not None:
            flare, _ = HistogramBinsCleanser(max_bins_percent=pct).apply(flare, "pooled")
        want_hists = {g: set(flare[StC.STATS_HISTOGRAM].get(g, {})) & want_features[g] for g in groups}
        features, hists = stats._feature_gate(spec, groups, counts, min_cell, pct)
        assert (features, hists) == (want_features, want_hists), (min_cell, pct)
