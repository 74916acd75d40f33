"""cohort_stats' proportions (exact Clopper–Pearson CI) and incidence rates (exact Poisson CI), pure math:
federated sums over a 3-way split of whas500 equal the pooled table's counts and statsmodels'/scipy's
intervals; small levels and rates are withheld with complementary suppression; never under DP."""

import json

import numpy as np
import pytest
from scipy.stats import chi2
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.rates import confint_poisson

from clinfed.analytics import stats
from clinfed.analytics.cohort_data import clinical_layout
from clinfed.analytics.stats import ALL, RESIDUAL, DPConfig, StatsSpec
from clinfed.data.clinical import load_dataset

PROPS = ("chf", "miord", "mitype")
RATE = ("event", "time")
REL = 5e-7  # released values carry 7 significant digits


@pytest.fixture(scope="module")
def whas():
    return load_dataset("whas500")


@pytest.fixture(scope="module")
def layout(whas):
    manifest = {"dataset": "whas500", "sites": {f"site-{i}": {"rows": 1, "events": 1} for i in (1, 2, 3)}}
    return clinical_layout(
        manifest, 3, features="age,bmi", group="gender", proportions=list(PROPS), rate="event:time", rate_per=1000
    )


def _masks(frame, values):
    g = frame["gender"].to_numpy()
    return {ALL: np.ones(len(frame), bool), **{name: g == v for name, v in values.items()}}


def _federate(frame, spec, values, parts, ctx_pair=None):
    """Pass-1 vectors of each part (a site), summed in plaintext or under CKKS as the job does."""
    vecs = []
    for p in parts:
        part = frame.iloc[p]
        cols = {c: part[c].to_numpy() for c in [*PROPS, *RATE]}
        x = part[list(spec.features)].to_numpy(dtype=float)
        vecs.append(stats.local_sums(x, _masks(part, values), spec, columns=cols))
    if ctx_pair is None:
        return stats.unpack_sums(sum(vecs), spec)
    from clinfed.he.aggregation import EncryptedSum
    from clinfed.he.ckks import decrypt_vector, encrypt_vector

    secret, public = ctx_pair
    acc = EncryptedSum(public, size=spec.pass1_size)
    for i, v in enumerate(vecs):
        acc.add(f"site-{i + 1}", encrypt_vector(secret, v), 1, acc.fingerprint)
    return stats.unpack_sums(decrypt_vector(secret, acc.result()[0], spec.pass1_size), spec)


def _parts(n, seed=1):
    return np.array_split(np.random.default_rng(seed).permutation(n), 3)


def test_public_layout_comes_from_the_bundled_dataset(layout, whas):
    spec, values = layout
    assert spec.features == ("age", "bmi") and spec.groups == (ALL, "0", "1") and values == {"0": "0", "1": "1"}
    assert dict(spec.proportions) == {"chf": ("0", "1"), "miord": ("0", "1"), "mitype": ("0", "1")}
    assert spec.rate == RATE and spec.rate_per == 1000 and spec.rate_unit == "person-days"
    assert spec.rate_bound == 2400.0 >= whas["time"].max()  # 2 358 days rounded up: the public time bound
    assert spec.pass1_size == 3 * (spec.block + 6 + 3) + 1
    assert StatsSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_spec_without_proportions_or_rate_keeps_its_layout_and_digest():
    spec = StatsSpec(("a",), ((0, 1),))
    assert "proportions" not in spec.to_dict() and "rate" not in spec.to_dict()
    assert spec.pass1_size == 3 * spec.block + 1 and not spec.has_extras
    assert spec.digest() == StatsSpec.from_dict(spec.to_dict()).digest()
    with pytest.raises(ValueError, match="may not be named 'rate'"):
        StatsSpec(("rate",), ((0, 1),))


@pytest.mark.parametrize("encrypted", [False, True])
def test_federated_proportions_and_rates_equal_the_pooled_table(layout, whas, encrypted):
    """Counts exact; proportion, CI against statsmodels proportion_confint(method="beta"); rate and CI
    against statsmodels confint_poisson("exact-c") and scipy's χ² (Garwood) on the pooled table."""
    spec, values = layout
    ctx = None
    if encrypted:
        from clinfed.he.context import create_context_pair

        ctx = create_context_pair()
    sums = _federate(whas, spec, values, _parts(len(whas)), ctx)
    out = stats.release(sums, np.zeros((spec.n_groups, spec.n_features)), spec, min_cell=10)
    assert not out["suppression"]["proportions_withheld"] and not out["suppression"]["rates_withheld"]
    checked = 0
    for g in spec.groups:
        rows = whas if g == ALL else whas[whas["gender"] == values[g]]
        for c in PROPS:
            n = int(rows[c].notna().sum())
            for level in ("0", "1"):
                k = int((rows[c] == level).sum())
                e = out["statistics"][g]["proportions"][c][level]
                low, high = proportion_confint(k, n, alpha=0.05, method="beta")
                assert e["count"] == k
                assert e["proportion"] == pytest.approx(k / n, rel=REL)
                assert e["ci_low"] == pytest.approx(low, rel=REL) and e["ci_high"] == pytest.approx(high, rel=REL)
                checked += 1
        r = out["statistics"][g]["rate"]
        events, pt = int(rows["event"].sum()), float(rows["time"].sum())
        assert (r["n"], r["events"], r["per"], r["unit"]) == (len(rows), events, 1000.0, "person-days")
        assert r["person_time"] == pytest.approx(pt, rel=REL) and r["person_time"] == pt  # whole days: exact
        low, high = confint_poisson(events, pt / 1000, method="exact-c")
        garwood = (chi2.ppf(0.025, 2 * events) / 2, chi2.ppf(0.975, 2 * events + 2) / 2)
        assert r["rate"] == pytest.approx(events / pt * 1000, rel=REL)
        assert r["ci_low"] == pytest.approx(low, rel=REL) and r["ci_high"] == pytest.approx(high, rel=REL)
        assert r["ci_low"] == pytest.approx(garwood[0] / pt * 1000, rel=REL)
        assert r["ci_high"] == pytest.approx(garwood[1] / pt * 1000, rel=REL)
    assert checked == 3 * 3 * 2


def test_interval_edges_match_the_references():
    for k, n in [(0, 10), (10, 10), (1, 7), (37, 211)]:
        low, high = stats.clopper_pearson(k, n)
        ref = proportion_confint(k, n, alpha=0.05, method="beta")
        assert (low, high) == pytest.approx(ref, rel=1e-12, abs=1e-15)
    for k in (0, 1, 12, 400):
        low, high = stats.poisson_exact(k)
        assert (low, high) == pytest.approx(confint_poisson(k, 1.0, method="exact-c"), rel=1e-12, abs=1e-15)


def test_large_person_time_travels_scaled_and_comes_back_to_7_digits():
    """Σ time far beyond the CKKS slot bound (2^20) travels divided by the public bound: the slot stays
    below the patient count, and the release keeps 7 significant digits."""
    spec = StatsSpec(("a",), ((0, 1),), groups=(ALL,), rate=RATE, rate_bound=50_000.0)
    rng = np.random.default_rng(3)
    time = rng.uniform(0, 50_000, 5_000)  # Σ ≈ 1.25e8
    event = (rng.random(5_000) < 0.3).astype(float)
    parts = np.array_split(np.arange(5_000), 3)
    vecs = [
        stats.local_sums(
            np.zeros((len(p), 1)), {ALL: np.ones(len(p), bool)}, spec, columns={"event": event[p], "time": time[p]}
        )
        for p in parts
    ]
    assert max(np.abs(v).max() for v in vecs) < 2_000
    sums = stats.unpack_sums(sum(vecs), spec)
    r = stats.release(sums, np.zeros((1, 1)), spec, min_cell=10)["statistics"][ALL]["rate"]
    assert r["person_time"] == pytest.approx(time.sum(), rel=REL) and r["person_time"] != time.sum()
    assert r["events"] == int(event.sum())


def _toy(levels_per_group, events, partition=("a", "b")):
    """A spec and Sums from given per-group level counts [[all], [a], [b]] and events (patients = 10 × events + 50)."""
    spec = StatsSpec(
        ("x",), ((0, 1),), groups=(ALL, *partition), proportions=(("c", ("p", "q", "r")),), rate=RATE, rate_bound=10.0
    )
    levels = np.array(levels_per_group, dtype=np.int64)
    rows = levels.sum(axis=1)
    ev = np.array(events, dtype=float)
    sums = stats.Sums(
        rows=rows,
        count=rows[:, None],
        total=np.zeros((len(rows), 1)),
        hist=np.tile(rows[:, None, None] // 10, (1, 1, 10)),
        contributors=3,
        levels=levels,
        rate=np.column_stack([rows.astype(float), ev, rows * 5.0]),
    )
    return spec, sums


def _hidden(out, g):
    return {lv for lv, e in out["statistics"][g]["proportions"]["c"].items() if e["count"] is None}


def test_a_small_level_is_withheld_with_complementary_cells_in_its_group_and_across_groups():
    # group a has 3 of level r: hidden, so one more of a's levels (the smallest, q) and, across groups,
    # r in another group (b's r, while all is released) too; all's line then needs a second cell.
    spec, sums = _toy([[80, 60, 43], [40, 30, 3], [40, 30, 40]], [30, 15, 15])
    out = stats.release(sums, np.zeros((3, 1)), spec, min_cell=10)
    hidden = {g: _hidden(out, g) for g in spec.groups}
    assert "r" in hidden["a"]
    for g in spec.groups:  # each group's levels: none or at least two hidden
        assert len(hidden[g]) != 1, hidden
    for level in ("p", "q", "r"):  # each level across all, a, b: none or at least two hidden
        assert sum(level in hidden[g] for g in spec.groups) != 1, (level, hidden)
    e = out["statistics"]["a"]["proportions"]["c"]["r"]
    assert e == {"count": None, "proportion": None, "ci_low": None, "ci_high": None}
    shown = out["statistics"]["b"]["proportions"]["c"]["p"]
    assert shown["count"] == 40 and shown["proportion"] == pytest.approx(40 / 110, rel=REL)
    withheld = out["suppression"]["proportions_withheld"]
    assert withheld["a"]["c"] == sorted(hidden["a"]) and out["suppression"]["proportion_cells_withheld_total"] >= 4
    assert "3" not in json.dumps(withheld)  # names the levels, never the small count


def test_a_rate_with_few_events_is_withheld_and_another_with_it():
    spec, sums = _toy([[80, 60, 60], [40, 30, 30], [40, 30, 30]], [45, 5, 40])
    out = stats.release(sums, np.zeros((3, 1)), spec, min_cell=10)
    rates = {g: out["statistics"][g]["rate"] for g in spec.groups}
    assert rates["a"]["events"] is None and rates["a"]["rate"] is None and rates["a"]["per"] == 1.0
    assert sum(r["events"] is None for r in rates.values()) == 2  # all − b would give a's events back
    assert "fewer than 10 events or patients" in out["suppression"]["rates_withheld"]["a"]
    assert any("complementary" in v for v in out["suppression"]["rates_withheld"].values())


def test_the_residual_is_protected_but_never_published():
    # 20 rows are in no declared group (all − a − b): 4 of level p, 0 of q, 16 of r; its small cells are
    # withheld though never published, so across groups a second p and a second q are withheld
    spec, sums = _toy([[84, 60, 76], [40, 30, 30], [40, 30, 30]], [40, 20, 18])
    out = stats.release(sums, np.zeros((3, 1)), spec, min_cell=10)
    hidden = {g: _hidden(out, g) for g in spec.groups}
    assert sum("p" in hidden[g] for g in spec.groups) >= 1 and sum("q" in hidden[g] for g in spec.groups) >= 1
    assert not any("r" in hidden[g] for g in spec.groups)
    assert RESIDUAL not in json.dumps(out["statistics"])
    assert RESIDUAL not in out["suppression"]["proportions_withheld"]
    # the residual has 2 events: all's rate would give them back, so one rate is withheld besides
    assert sum(out["statistics"][g]["rate"]["events"] is None for g in spec.groups) >= 1


def test_a_level_outside_the_public_levels_is_refused_naming_the_column_only():
    spec = StatsSpec(("x",), ((0, 1),), groups=(ALL,), proportions=(("c", ("p", "q")),))
    with pytest.raises(ValueError, match=r"column 'c' holds a value outside its 2 public levels") as err:
        stats.local_sums(np.zeros((3, 1)), {ALL: np.ones(3, bool)}, spec, columns={"c": ["p", "secret-z", None]})
    assert "secret-z" not in str(err.value)
    vec = stats.local_sums(np.zeros((3, 1)), {ALL: np.ones(3, bool)}, spec, columns={"c": ["p", "q", None]})
    assert stats.unpack_sums(vec + vec + vec, spec).levels.tolist() == [[3, 3]]


def test_numeric_levels_match_their_text():
    got = stats.level_index(["1", 1, 1.0, "1.0", None, float("nan"), "0"], ("0", "1"), "c")
    assert got.tolist() == [1, 1, 1, 1, -1, -1, 0]


def test_never_released_unnoised_under_dp(layout, whas):
    spec, values = layout
    sums = _federate(whas, spec, values, _parts(len(whas)))
    with pytest.raises(ValueError, match="not released under output DP"):
        stats.release(sums, np.zeros((3, 2)), spec, dp=DPConfig(epsilon=1.0))
    from clinfed.analytics.sums_fl import SumsRecipe

    method = {"method": "cohort", "spec": spec.to_dict(), "group_values": values, "group_column": "gender"}
    with pytest.raises(ValueError, match="not released under output DP"):
        SumsRecipe("cohort_stats", 3, {**method, "dp": {"epsilon": 1.0}})


def test_make_recipe_refuses_dp_unknown_and_continuous_columns(tmp_path):
    from clinfed.data.sitedb import split_dataset
    from clinfed.jobs import load_job

    split_dataset("whas500", 3, tmp_path)
    job = load_job("cohort_stats")
    with pytest.raises(ValueError, match="not released under output DP"):
        job.make_recipe(sites=3, epsilon=1.0, data_dir=str(tmp_path), proportions="chf")
    with pytest.raises(ValueError, match="has no column 'nosuch'"):
        job.make_recipe(sites=3, data_dir=str(tmp_path), proportions="nosuch")
    with pytest.raises(ValueError, match="not categorical"):
        job.make_recipe(sites=3, data_dir=str(tmp_path), group="age")
    with pytest.raises(ValueError, match="EVENT:TIME"):
        job.make_recipe(sites=3, data_dir=str(tmp_path), rate="event")
    with pytest.raises(ValueError, match="need --data-dir"):
        job.make_recipe(sites=3, proportions="chf")
    recipe = job.make_recipe(sites=3, data_dir=str(tmp_path), group="gender", proportions="chf", rate="event:time")
    assert recipe.num_sites == 3


def test_the_release_log_refuses_a_second_release_that_shows_a_withheld_level_or_rate(tmp_path):
    """Differencing across jobs: the same cohort released again with a lower minimum cell would show
    the level (and the rate) the first release withheld; each site's release log refuses it."""
    from clinfed.analytics.release_log import CohortDefinition, ReleaseLog, cells_of
    from clinfed.errors import SiteRefusal

    spec, sums = _toy([[80, 60, 43], [40, 30, 3], [40, 30, 40]], [30, 5, 25])
    strict = stats.release(sums, np.zeros((3, 1)), spec, min_cell=10)
    lax = stats.release(sums, np.zeros((3, 1)), spec, min_cell=1)
    assert strict["statistics"]["a"]["proportions"]["c"]["r"]["count"] is None
    assert lax["statistics"]["a"]["proportions"]["c"]["r"]["count"] == 3
    definition = CohortDefinition.of("all", ["site-1", "site-2", "site-3"], "g", {"a": 0, "b": 1}, "digest")
    log = ReleaseLog(tmp_path, "site-1")
    log.admit(definition, cells_of(spec, strict["statistics"]), job="first")
    log.admit(definition, cells_of(spec, strict["statistics"]), job="same again")  # identical: admitted
    with pytest.raises(SiteRefusal):
        log.admit(definition, cells_of(spec, lax["statistics"]), job="differencing")
