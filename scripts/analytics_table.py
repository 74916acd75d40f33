"""The statistician's toolbox against its pooled references: measured numbers for docs/toolbox.md.

Each method's federated math (`clinfed.analytics.<method>.fit_federated`: the site vectors summed in
plain numpy, exactly the sums the encrypted job adds) on a bundled dataset dealt to 3 sites, against
the reference library on the pooled table. `tests/unit/test_toolbox_methods.py` asserts every row's
tolerance, so the table written here is the one the tests check. Run:
`python scripts/analytics_table.py` (writes docs/toolbox.md; `--print` only prints).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "toolbox.md"


def _rel(ours: Any, ref: Any) -> float:
    a, b = np.asarray(ours, dtype=float).ravel(), np.asarray(ref, dtype=float).ravel()
    if a.shape != b.shape:
        return float("inf")
    both_nan = np.isnan(a) & np.isnan(b)
    a, b = a[~both_nan], b[~both_nan]
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _row(method: str, statistic: str, ours: Any, ref: Any, reference: str, tol: float = 1e-6) -> dict:
    show = np.asarray(ours, dtype=float).ravel()
    return {
        "method": method,
        "statistic": statistic,
        "ours": float(show[0]) if show.size == 1 else f"{show.size} values",
        "reference": reference,
        "max_rel_diff": _rel(ours, ref),
        "tolerance": tol,
    }


def _sites(frame, n: int = 3, seed: int = 1) -> dict[str, dict]:
    from clinfed.analytics.federated import split_table

    return split_table({c: frame[c].to_numpy() for c in frame.columns}, n, seed)


#: Released blocks of encrypted simulator runs, by case (`encrypted_runs`); empty: the plain-sum math only.
ENCRYPTED: dict[str, dict] = {}


def _ours(case: str, compute):
    """The encrypted run's released block for `case` when there is one, else the plain-sum math's."""
    return ENCRYPTED[case] if case in ENCRYPTED else compute()


def _label(name: str, case: str) -> str:
    return f"{name} (encrypted, 3 sites)" if case in ENCRYPTED else name


def crosstab_rows() -> list[dict]:
    from scipy import stats

    from clinfed.analytics import crosstab
    from clinfed.data.clinical import load_dataset

    gbsg = load_dataset("gbsg2")
    out = []
    for rows, cols in (("horTh", "tgrade"), ("horTh", "menostat")):
        r_lv, c_lv = sorted(gbsg[rows].unique()), sorted(gbsg[cols].unique())
        case = f"crosstab:{rows}:{cols}"
        res = _ours(case, lambda r=rows, c=cols, a=r_lv, b=c_lv: crosstab.fit_federated(_sites(gbsg), r, c, a, b, 5))
        import pandas as pd

        ref_table = pd.crosstab(gbsg[rows], gbsg[cols]).to_numpy()
        chi2, p, df, _ = stats.chi2_contingency(ref_table)
        name = _label(f"crosstab gbsg2 {rows}×{cols}", case)
        out.append(_row(name, "table", res["table"], ref_table, "pandas.crosstab", 0.0))
        out.append(_row(name, "χ²" + (" (Yates)" if df == 1 else ""), res["chi2"], chi2, "scipy chi2_contingency"))
        out.append(_row(name, "p", res["p"], p, "scipy chi2_contingency"))
        if ref_table.shape == (2, 2):
            out.append(_row(name, "Fisher p", res["fisher_p"], stats.fisher_exact(ref_table)[1], "scipy fisher_exact"))
    return out


def ttest_rows() -> list[dict]:
    from scipy import stats

    from clinfed.analytics import ttest
    from clinfed.data.clinical import load_dataset

    gbsg = load_dataset("gbsg2")
    out = []
    levels = ["no", "yes"]
    res = _ours(
        "ttest:horTh", lambda: ttest.fit_federated(_sites(gbsg), "age", "horTh", levels, float(gbsg["age"].mean()))
    )
    a, b = (gbsg.loc[gbsg["horTh"] == v, "age"] for v in levels)
    name = _label("ttest gbsg2 age by horTh", "ttest:horTh")
    for key, equal in (("student", True), ("welch", False)):
        ref = stats.ttest_ind(a, b, equal_var=equal)
        out.append(_row(name, f"{key} t", res[key]["t"], ref.statistic, "scipy ttest_ind"))
        out.append(_row(name, f"{key} p", res[key]["p"], ref.pvalue, "scipy ttest_ind"))
        out.append(_row(name, f"{key} df", res[key]["df"], ref.df, "scipy ttest_ind"))
    out.append(_row(name, "sd per group", [res["groups"][v]["sd"] for v in levels], [a.std(), b.std()], "pandas std"))
    levels = sorted(gbsg["tgrade"].unique())
    res = _ours(
        "ttest:tgrade", lambda: ttest.fit_federated(_sites(gbsg), "age", "tgrade", levels, float(gbsg["age"].mean()))
    )
    ref = stats.f_oneway(*(gbsg.loc[gbsg["tgrade"] == v, "age"] for v in levels))
    name = _label("ANOVA gbsg2 age by tgrade", "ttest:tgrade")
    out.append(_row(name, "F", res["anova"]["F"], ref.statistic, "scipy f_oneway"))
    out.append(_row(name, "p", res["anova"]["p"], ref.pvalue, "scipy f_oneway"))
    return out


def correlation_rows() -> list[dict]:
    from clinfed.analytics import correlation
    from clinfed.data.clinical import load_dataset

    fl = load_dataset("flchain")
    names = ["age", "kappa", "lambda", "creatinine"]
    res = _ours(
        "correlation", lambda: correlation.fit_federated(_sites(fl), names, [float(fl[c].mean()) for c in names])
    )
    name = _label("correlation flchain " + ",".join(names), "correlation")
    ref_n = fl[names].notna().astype(int).T @ fl[names].notna().astype(int)
    return [
        _row(name, "Pearson matrix", res["matrix"], fl[names].corr().to_numpy(), "pandas DataFrame.corr"),
        _row(name, "covariance", res["covariance"], fl[names].cov().to_numpy(), "pandas DataFrame.cov"),
        _row(name, "n per pair", res["n"], ref_n.to_numpy(), "pandas notna counts", 0.0),
    ]


def _binned_for_aj(time, event, time_bin):
    """Binned times with ties among events broken inside the bin (events first, then censorings at the end):
    lifelines' AalenJohansenFitter would otherwise jitter them at random; the estimate is unchanged."""
    from clinfed.analytics.km import bin_index

    t = bin_index(np.asarray(time), time_bin) * float(time_bin)
    order = np.arange(t.size, dtype=float)
    return np.where(np.asarray(event) > 0, t - 1e-3 * time_bin * (1 + order) / (1 + t.size), t)


def cif_rows() -> list[dict]:
    from lifelines import AalenJohansenFitter
    from lifelines.statistics import multivariate_logrank_test

    from clinfed.analytics import cif
    from clinfed.analytics.km import bin_index, n_bins_for
    from clinfed.data.clinical import load_dataset

    fl = load_dataset("flchain")
    causes = ["Circulatory", "Neoplasms", cif.OTHER]
    tb = 30.0
    nb = n_bins_for(float(fl["time"].max()), tb)
    res = _ours(
        "cif",
        lambda: cif.fit_federated(
            _sites(fl), causes=causes, cause_col="chapter", time_bin=tb, n_bins=nb, group_col="sex", levels=["F", "M"]
        )[0],
    )
    code = np.where(fl["event"] == 0, 0, np.where(fl["chapter"] == "Circulatory", 1, 0))
    code = np.where((fl["event"] == 1) & (fl["chapter"] == "Neoplasms"), 2, code)
    code = np.where((fl["event"] == 1) & ~fl["chapter"].isin(causes[:2]), 3, code)
    out = []
    for sex in ("F", "M"):
        m = (fl["sex"] == sex).to_numpy()
        t = _binned_for_aj(fl["time"].to_numpy()[m], code[m], tb)
        curve = res["groups"][sex]
        for ci, cause in enumerate(causes, start=1):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                aj = AalenJohansenFitter(calculate_variance=False).fit(t, code[m], event_of_interest=ci)
            ref = aj.cumulative_density_.iloc[:, 0]
            ref_at = np.array([ref[ref.index <= x].iloc[-1] for x in curve["time"]])
            out.append(
                _row(
                    _label(f"CIF flchain sex={sex}", "cif"),
                    f"CIF {cause}",
                    curve["cif"][cause],
                    ref_at,
                    "lifelines AalenJohansen",
                )
            )
    tbin = bin_index(fl["time"].to_numpy(), tb) * tb
    for ci, cause in enumerate(causes, start=1):
        ref = multivariate_logrank_test(tbin, fl["sex"], code == ci)
        out.append(
            _row(
                _label("CIF flchain by sex", "cif"),
                f"cause-specific log-rank χ² {cause}",
                res["tests"][cause]["chi2"],
                ref.test_statistic,
                "lifelines multivariate_logrank_test",
            )
        )
    return out


def glm_offset_rows() -> list[dict]:
    import statsmodels.api as sm

    from clinfed.analytics import glm
    from clinfed.data.clinical import load_dataset

    gbsg = load_dataset("gbsg2")
    covs = ["age", "tsize", "pnodes"]
    frame = gbsg.assign(log_time=np.log(gbsg["time"]))
    res = _ours(
        "glm",
        lambda: glm.fit_federated(_sites(frame), family="poisson", outcome="event", covariates=covs, offset="log_time"),
    )
    x = sm.add_constant(frame[covs])
    ref = sm.GLM(frame["event"], x, family=sm.families.Poisson(), offset=frame["log_time"]).fit(tol=1e-13)
    names = ["intercept", *covs]
    coef = [res["coef"][n]["coef"] for n in names]
    se = [res["coef"][n]["se"] for n in names]
    name = _label("Poisson GLM gbsg2 event ~ age+tsize+pnodes, offset log(time)", "glm")
    return [
        _row(name, "coef", coef, ref.params.to_numpy(), "statsmodels GLM offset"),
        _row(name, "IRR", np.exp(coef), np.exp(ref.params.to_numpy()), "statsmodels GLM offset"),
        _row(name, "se", se, ref.bse.to_numpy(), "statsmodels GLM offset"),
        _row(name, "deviance", res["deviance"], ref.deviance, "statsmodels GLM offset"),
    ]


def roc_rows() -> list[dict]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from clinfed.analytics import roc
    from clinfed.analytics.federated import split_rows

    x, y = load_breast_cancer(return_X_y=True)
    y = 1 - y
    x = StandardScaler().fit_transform(x)
    model = LogisticRegression(C=0.05, max_iter=1000).fit(x[::2], y[::2])  # scored on the other half
    xs, ys = x[1::2], y[1::2]
    scores = model.predict_proba(xs)[:, 1]
    parts = split_rows(len(ys), 3, seed=1)
    res = roc.fit_federated({f"site-{i}": (scores[p], ys[p]) for i, p in enumerate(parts)})
    ref = roc_auc_score(ys, scores)
    binned = roc_auc_score(ys, np.minimum(np.floor(scores * roc.DEFAULT_BINS), roc.DEFAULT_BINS - 1))
    name = f"ROC breast_cancer logistic, {roc.DEFAULT_BINS} score bins"
    return [
        _row(name, "AUC (binned scores)", res["auc"], binned, "sklearn roc_auc_score on binned scores"),
        _row(
            name,
            f"AUC (resolution {res['auc_resolution']:.1e})",
            res["auc"],
            ref,
            "sklearn roc_auc_score",
            res["auc_resolution"] / ref * (1 + 1e-9),
        ),
    ]


#: (case, job, dataset, options) of the encrypted runs behind `--encrypted`
RUNS = [
    ("crosstab:horTh:tgrade", "crosstab", "gbsg2", {"rows": "horTh", "cols": "tgrade"}),
    ("crosstab:horTh:menostat", "crosstab", "gbsg2", {"rows": "horTh", "cols": "menostat"}),
    ("ttest:horTh", "ttest", "gbsg2", {"variable": "age", "group": "horTh"}),
    ("ttest:tgrade", "ttest", "gbsg2", {"variable": "age", "group": "tgrade"}),
    ("correlation", "correlation", "flchain", {"variables": "age,kappa,lambda,creatinine"}),
    ("cif", "cumulative_incidence", "flchain", {"group": "sex", "cause": "chapter:Circulatory,Neoplasms"}),
    (
        "glm",
        "glm",
        "gbsg2",
        {"family": "poisson", "outcome": "event", "covariates": ["age", "tsize", "pnodes"], "offset": "log(time)"},
    ),
]


def encrypted_runs(workdir: Path) -> dict[str, float]:
    """Run every case encrypted in FLARE's simulator (3 sites); fill ENCRYPTED; wall seconds per case."""
    import time

    from clinfed.data.sitedb import split_dataset
    from clinfed.simulate import SimulationRequest, run_simulation

    seconds = {}
    for case, job, dataset, options in RUNS:
        data = workdir / dataset
        if not data.exists():
            split_dataset(dataset, 3, data, seed=1)
        start = time.monotonic()
        summary = run_simulation(
            SimulationRequest(
                job=job,
                sites=3,
                out=workdir / case.replace(":", "-"),
                data_dir=str(data),
                min_cell=1 if job == "cumulative_incidence" else None,
                extra={"data_dir": str(data), **options},
            )
        )
        seconds[case] = time.monotonic() - start
        if summary["final"]["status"] != "released":
            raise RuntimeError(f"{case}: {summary['final']['reason']}")
        ENCRYPTED[case] = summary[summary["method"]]
    return seconds


def comparisons() -> list[dict]:
    return [*crosstab_rows(), *ttest_rows(), *correlation_rows(), *cif_rows(), *glm_offset_rows(), *roc_rows()]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| method | statistic | ours | reference | max relative difference | tolerance |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = f"{r['ours']:.10g}" if isinstance(r["ours"], float) else r["ours"]
        lines.append(
            f"| {r['method']} | {r['statistic']} | {ours} | {r['reference']} | {r['max_rel_diff']:.1e} | "
            f"{r['tolerance']:.1e} |"
        )
    return "\n".join(lines)


HEADER = """# Clinical analytics against their pooled references

Each method on a bundled dataset dealt to 3 sites, against the reference library on the pooled
table. Written by `python scripts/analytics_table.py --encrypted` from measured numbers: rows marked
"encrypted, 3 sites" are the values released by the job run in FLARE's simulator under CKKS (the same
as `clinfed simulate JOB --sites 3`; CKKS' ~1e-9 error, released floats rounded to 7 significant
digits); the others (and every row without `--encrypted`) are the method's sums added in plain
numpy (`clinfed.analytics.<method>.fit_federated`), the very sums the encrypted job adds.
`tests/unit/test_toolbox_methods.py` checks every plain row's tolerance and
`tests/integration/test_toolbox_sim.py` the encrypted jobs against the same references.

## Jobs (one encrypted round on the generic sums pair, ≥ 3 sites)

```
clinfed data split --dataset gbsg2 --sites 3 --out data/gbsg2
clinfed data split --dataset flchain --sites 3 --out data/flchain
clinfed simulate crosstab --sites 3 --data-dir data/gbsg2 --rows horTh --cols menostat   # χ², Fisher (2×2)
clinfed simulate ttest --sites 3 --data-dir data/gbsg2 --variable age --group horTh      # Student, Welch
clinfed simulate ttest --sites 3 --data-dir data/gbsg2 --variable age --group tgrade     # one-way ANOVA
clinfed simulate correlation --sites 3 --data-dir data/flchain --variables age,kappa,lambda,creatinine
clinfed simulate cumulative_incidence --sites 3 --data-dir data/flchain --group sex \
    --cause chapter:Circulatory,Neoplasms --time-bin 30
clinfed simulate glm --sites 3 --data-dir data/gbsg2 --family poisson --outcome event \
    --covariates age,tsize,pnodes --offset 'log(time)'                                  # rate ratios (IRR)
```

An option the job does not take (`--rows` on `glm`, `--covariates` on `ttest`) exits 2 in one line.
Competing risks: no bundled dataset has them, so `cumulative_incidence` derives them from flchain's
cause of death (`chapter`): the named causes, and every other death as `other`.

Disclosure control: crosstab releases its table only when every cell is 0 or ≥ the minimum cell
(DataSHIELD's `nfilter.tab`), ttest withholds a group under it, correlation a pair under it,
cumulative incidence merges bins as survival_km does; the release site's release log for each
of crosstab, ttest and correlation (`local/release_log-<method>.json`) refuses a release over
another set of sites or with other counts for the same variables. Output DP (`--epsilon`): crosstab
and cumulative_incidence (a patient is one count), charged to every site's one ledger; ttest and
correlation sum unbounded values and refuse it.

ROC: `clinfed.analytics.roc` turns per-site score histograms (negatives, positives and Σ score per
bin) into the pooled ROC curve, AUC and calibration (the table's last rows). Every training job's
final validation releases it as summary.json's `roc` (`clinfed.fl.roc_validation`): each site
scores its held-out patients with the model it decrypted itself, and the histograms travel under the
training jobs' secure-aggregation masks (task `roc_release`), so no single site's histogram can be
decrypted; on breast_cancer_dp the released AUC equals sklearn's on the pooled held-out scores
within the stated `auc_resolution`. Segmentation jobs have no per-patient score: `roc` says skipped.

## Against the references

Binned methods: the cumulative incidence (Aalen–Johansen) is exact on times rounded up to 30-day
bins (lifelines fitted on the same binned times); the ROC's AUC is exact on scores binned to 1/1000
and within `auc_resolution` (Σ neg·pos per bin / 2NP) of the unbinned AUC.

"""


def main(argv: list[str]) -> int:
    timing = ""
    if "--encrypted" in argv:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            seconds = encrypted_runs(Path(tmp))
        timing = (
            "\nWall time of each encrypted run (`run_simulation`, 3 sites, 2 cores shared with other work):\n\n"
            + "\n".join(f"- {case}: {s:.1f} s" for case, s in seconds.items())
        )
    rows = comparisons()
    text = HEADER + markdown(rows) + "\n" + timing + ("\n" if timing else "")
    if "--print" in argv:
        print(text)
    else:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    bad = [r for r in rows if not r["max_rel_diff"] <= r["tolerance"]]
    for r in bad:
        print(f"over tolerance: {r['method']} {r['statistic']}: {r['max_rel_diff']:.2e}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
