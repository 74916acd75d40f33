"""cohort_stats quantiles (issue 13): median, q25, q75 from a fine encrypted histogram, checked against
np.quantile on the pooled rows (default method), and the rule that keeps them from undoing cell
suppression. No FLARE; one CKKS round trip."""

import numpy as np
import pytest

from clinfed.analytics import stats
from clinfed.analytics.stats import ALL, QUANTILES, StatsSpec
from clinfed.data import breast_cancer as bc

FINE = 200


def _masks(y):
    return {ALL: np.ones(len(y), bool), "malignant": y == 1, "benign": y == 0}


@pytest.fixture(scope="module")
def table():
    return bc.load_bundled()


@pytest.fixture(scope="module")
def spec(table):
    return StatsSpec(tuple(table.features), tuple(stats.reference_bounds(table.x)), quantile_bins=FINE)


def _pooled(x, masks, spec, parts):
    """Pass-1 sums of the row sets ``parts``, added in plaintext as the server adds ciphertexts."""
    return stats.unpack_sums(
        sum(stats.local_sums(x[p], {g: m[p] for g, m in masks.items()}, spec) for p in parts), spec
    )


def _worst_error(release, x, masks, spec):
    """Worst |released − np.quantile| over released quantiles, as a fraction of the feature's range,
    and how many were released / withheld."""
    ref = stats.pooled_reference(x, masks, spec)
    worst, shown, null = 0.0, 0, 0
    for g, feats in release["statistics"].items():
        for f, e in feats.items():
            j = spec.features.index(f)
            for k in QUANTILES:
                if e[k] is None:
                    null += 1
                    continue
                shown += 1
                worst = max(worst, abs(e[k] - ref[g][f][k]) / (spec.hi[j] - spec.lo[j]))
    return worst, shown, null


# --- the pure estimate ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 40, 1000, 20_000])
@pytest.mark.parametrize("shape", ["uniform", "normal", "lognormal", "ties", "two_points"])
def test_histogram_quantile_is_within_one_fine_bin_of_np_quantile(n, shape):
    rng = np.random.default_rng(n)
    lo, hi = 0.0, 50.0
    x = {
        "uniform": lambda: rng.uniform(lo, hi, n),
        "normal": lambda: np.clip(rng.normal(20, 4, n), lo, hi),
        "lognormal": lambda: np.clip(rng.lognormal(1.0, 0.8, n), lo, hi),
        "ties": lambda: rng.integers(0, 6, n).astype(float) * 7.5,  # values on bin edges, many equal
        "two_points": lambda: np.where(rng.random(n) < 0.5, 3.3, 41.0),  # a gap between the two ranks
    }[shape]()
    edges = np.linspace(lo, hi, FINE + 1)
    counts = stats.histogram_counts(x, edges)
    width = (hi - lo) / FINE
    for q in QUANTILES.values():
        estimate = stats.histogram_quantile(counts, edges, q)
        truth = float(np.quantile(x, q))
        assert abs(estimate - truth) < width * (1 + 1e-9), (q, estimate, truth)
        snapped = stats.snap_to_grid(estimate, edges)
        assert abs(snapped - truth) < 1.5 * width * (1 + 1e-9) < 0.01 * (hi - lo)
        assert np.isclose((snapped - lo) / width, round((snapped - lo) / width))  # on the fine grid


def test_histogram_quantile_of_nothing_is_none_and_shapes_are_checked():
    assert stats.histogram_quantile(np.zeros(4), np.linspace(0, 1, 5), 0.5) is None
    with pytest.raises(ValueError, match="bins but"):
        stats.histogram_quantile(np.ones(4), np.linspace(0, 1, 4), 0.5)


# --- layout ----------------------------------------------------------------------------------------------------
def test_fine_histograms_add_groups_times_features_times_bins_slots(table, spec):
    from clinfed.he.params import DEFAULT_PARAMS, ciphertexts_for

    coarse = StatsSpec(spec.features, spec.bounds)
    assert coarse.quantile_bins == 0 and coarse.pass1_size == 1084  # the layout before issue 13
    assert spec.pass1_size - coarse.pass1_size == 3 * 30 * FINE == 18_000
    assert ciphertexts_for(DEFAULT_PARAMS, coarse.pass1_size) == 1
    assert ciphertexts_for(DEFAULT_PARAMS, spec.pass1_size) == 10
    assert spec.pass2_size == coarse.pass2_size
    # a layout without fine bins keeps its config and digest (old jobs, the release log's grid)
    assert "quantile_bins" not in coarse.to_dict() and StatsSpec.from_dict(spec.to_dict()) == spec
    assert coarse.digest() != spec.digest()
    with pytest.raises(ValueError, match="multiple of bins"):
        StatsSpec(("a",), ((0, 1),), bins=10, quantile_bins=25)


def test_coarse_histograms_and_their_suppression_are_unchanged_by_the_fine_ones(table, spec):
    parts = bc.dirichlet_split(table.y, 3)
    coarse = StatsSpec(spec.features, spec.bounds)
    m2 = np.ones((3, spec.n_features))
    with_q = stats.release(_pooled(table.x, _masks(table.y), spec, parts), m2, spec, min_cell=10)
    without = stats.release(_pooled(table.x, _masks(table.y), coarse, parts), m2, coarse, min_cell=10)
    assert with_q["suppression"] == without["suppression"]
    for g, feats in without["statistics"].items():
        for f, e in feats.items():
            assert all(e[k] is None for k in QUANTILES)
            rest = {k: v for k, v in e.items() if k not in QUANTILES}
            assert {k: v for k, v in with_q["statistics"][g][f].items() if k not in QUANTILES} == rest


# --- real data -------------------------------------------------------------------------------------------------
def test_released_quantiles_of_the_bundled_data_under_ckks_are_within_1_percent_of_range(table, spec):
    from clinfed.he.aggregation import EncryptedSum
    from clinfed.he.ckks import decrypt_vector, encrypt_vector
    from clinfed.he.context import create_context_pair

    secret, public = create_context_pair()
    masks = _masks(table.y)
    acc = EncryptedSum(public, size=spec.pass1_size)
    for i, p in enumerate(bc.dirichlet_split(table.y, 3)):
        vec = stats.local_sums(table.x[p], {g: m[p] for g, m in masks.items()}, spec)
        acc.add(f"site-{i + 1}", encrypt_vector(secret, vec), 1, acc.fingerprint)
    sums = stats.unpack_sums(decrypt_vector(secret, acc.result()[0], spec.pass1_size), spec)
    release = stats.release(sums, np.ones((3, spec.n_features)), spec, min_cell=10)
    worst, shown, null = _worst_error(release, table.x, masks, spec)
    assert worst < 0.0075  # 1.5 fine bins of 0.5 % each
    assert shown + null == 3 * 30 * 3 and shown > null


def test_quantiles_of_flchain_with_missing_values_over_five_sites_are_within_1_percent_of_range():
    from clinfed.data.clinical import load_dataset

    frame = load_dataset("flchain")
    features = ["time", "age", "creatinine", "kappa", "lambda"]
    x = frame[features].to_numpy(dtype=float)
    assert np.isnan(x[:, 2]).any()  # creatinine has missing values: skipped per feature
    sex = frame["sex"].astype(str).to_numpy()
    levels = sorted(set(sex))
    masks = {ALL: np.ones(len(x), bool), **{lv: sex == lv for lv in levels}}
    spec = StatsSpec(tuple(features), tuple(stats.reference_bounds(x)), groups=(ALL, *levels), quantile_bins=FINE)
    parts = np.array_split(np.random.default_rng(1).permutation(len(x)), 5)
    release = stats.release(_pooled(x, masks, spec, parts), np.ones((3, 5)), spec, min_cell=10)
    worst, shown, _ = _worst_error(release, x, masks, spec)
    assert worst < 0.0075 and shown >= 20


# --- disclosure ---------------------------------------------------------------------------------------------------
def test_a_quantile_is_null_when_its_group_feature_or_histogram_is_withheld_and_under_dp(table, spec):
    parts = bc.dirichlet_split(table.y, 3)
    sums = _pooled(table.x, _masks(table.y), spec, parts)
    rel = stats.release(sums, np.ones((3, spec.n_features)), spec, min_cell=300)
    assert set(rel["statistics"]) == {"benign"}  # malignant (212 rows) and, by complement, all withheld
    noisy = stats.release(sums, np.ones((3, spec.n_features)), spec, dp=stats.DPConfig(epsilon=5.0))
    assert all(e[k] is None for feats in noisy["statistics"].values() for e in feats.values() for k in QUANTILES)
    assert "withheld under output DP" in noisy["precision"]["quantiles"]
    few = stats.release(sums, np.ones((3, spec.n_features)), spec, min_cell=10, max_bins_percent=1.0)
    for feats in few["statistics"].values():  # 10 bins is not below 1 % of 212..569 values: no histograms
        for e in feats.values():
            assert e["histogram"] is None and all(e[k] is None for k in QUANTILES)


def _split_withheld(counts, hidden, rng):
    """Another histogram with the same released cells and the same withheld total, split differently."""
    other = counts.copy()
    idx = sorted(hidden)
    if not idx:
        return other
    total = int(counts[idx].sum())
    other[idx] = rng.multinomial(total, np.ones(len(idx)) / len(idx))
    return other


def test_what_a_quantile_says_follows_from_the_released_cells_alone():
    """The attacker knows the released cells and the withheld total and wants a withheld cell. For
    any two histograms that agree on what was released, the quantile's release decision and, when
    released, the coarse cell its ranks fall in must be the same: then the quantile cannot tell the
    two apart by anything about a withheld cell."""
    rng = np.random.default_rng(7)
    released_cases = 0
    for _ in range(400):
        bins = 10
        counts = rng.integers(0, 60, bins)
        hidden = set(rng.choice(bins, size=int(rng.integers(0, 4)), replace=False).tolist())
        other = _split_withheld(counts, hidden, rng)
        for q in QUANTILES.values():
            a, b = stats.quantile_cells(counts, hidden, q), stats.quantile_cells(other, hidden, q)
            assert a == b
            if a:
                released_cases += 1
                n = int(counts.sum())
                for k in {int(np.floor((n - 1) * q)), min(int(np.floor((n - 1) * q)) + 1, n - 1)}:
                    cell = lambda c, k=k: int(np.searchsorted(np.cumsum(c), k, side="right"))  # noqa: E731
                    assert cell(counts) == cell(other) and cell(counts) not in hidden
    assert released_cases > 300


def test_tails_withheld_on_both_sides_withhold_a_median_whose_cell_depends_on_their_split():
    counts = np.array([9, 10, 10, 10, 10, 9])  # n = 58, median ranks 28/29 in cell 2 or 3
    hidden = {0, 5}
    # below cell 2 lie 10 released + between 0 and 18 withheld values: rank 28 may be in cell 2 or 3
    assert not stats.quantile_cells(counts, hidden, 0.5)
    assert stats.quantile_cells(counts, set(), 0.5)
    assert stats.quantile_cells(np.array([9, 10, 10, 40, 10, 9]), hidden, 0.5)  # cell 3 whatever the split
