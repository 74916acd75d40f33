"""report.html is written from summary.json alone, self-contained, with the tables and figures each job
kind calls for (and none that do not fit it), and renders any block it does not know as a table."""

import base64
import re
import shutil
import subprocess

import pytest

from clinfed.report import is_training, render_report, write_report

SITES = ["site-1", "site-2", "site-3"]


def _sums(job, method, block, **extra):
    return {
        "job": job,
        "method": method,
        "sites": SITES,
        "encrypted": True,
        "rounds_completed": 1,
        "rounds": [
            {"round": 0, "phase": "p", "sites": {s: {"status": "ok", "reason": "", "bytes_sent": 33099} for s in SITES}}
        ],
        "final": {
            "status": "released",
            "reason": "",
            "release_site": "site-1",
            "metrics": {"sites_contributing": 3, "seconds": 37.521},
            "primary_metric": "seconds",
        },
        method: block,
        "provenance": {method: {"sites": SITES, "n": 708, "suppressed": "none"}},
        "admission": {s: {"status": "accepted", "reason": "", "planned_epsilon": 0.0} for s in SITES},
        **extra,
    }


KM = {
    "time_bin": 365.0,
    "groups": {
        g: {
            "time": [365.0, 730.0, 1095.0],
            "survival": [0.98, 0.95, 0.9],
            "at_risk": [300, 250, 120],
            "events": [6, 7, 12],
            "censored": [44, 123, 108],
            "median": None,
            "median_ci": [None, None],
        }
        for g in ("0", "1")
    },
    "logrank": {"chi2": 0.1432, "df": 1, "p": 0.705},
}
COX = {
    "coef": {
        "age": {"coef": -0.0094, "se": 0.005, "hr": 0.9906, "ci_low": 0.981, "ci_high": 1.0003, "p": 0.0586},
        "male": {"coef": -0.0556, "se": 0.2126, "hr": 0.9459, "ci_low": 0.62, "ci_high": 1.43, "p": 0.794},
    },
    "loglik": -420.5,
    "iterations": 4,
    "converged": True,
    "n": 708,
    "events": 92,
    "strata": "site",
    "time_bin": None,
    "concordance": 0.55,
}
GLM = {
    "family": "binomial",
    "coef": {
        "age": {"coef": -0.0059, "se": 0.0052, "z": -1.136, "p": 0.256, "ci_low": -0.016, "ci_high": 0.0043},
        "intercept": {"coef": -1.573, "se": 0.3046, "z": -5.163, "p": 2.4e-7, "ci_low": -2.17, "ci_high": -0.976},
    },
    "deviance": 488.8188,
    "iterations": 6,
    "n": 628,
}
STATS = {"all": {"age": {"count": 708, "mean": 37.8, "std": 23.5, "median": 36.0, "q25": 18.0, "q75": 56.0}}}
TRAINING = {
    "job": "breast_cancer_dp",
    "sites": SITES,
    "encrypted": True,
    "rounds_completed": 2,
    "rounds": [
        {
            "round": r,
            "sites": {
                s: {"status": "ok", "metrics": {"auc": 0.9 + r / 100}, "epsilon": 1.5 * (r + 1), "bytes_sent": 1000}
                for s in SITES
            },
        }
        for r in range(2)
    ],
    "final": {"metrics": {"auc": 0.97}, "per_site": {}, "primary_metric": "auc"},
    "privacy": {
        s: {"epsilon": 3.0, "delta": 1e-5, "accountant": "rdp", "budget": 10.0, "history": [[1.1, 0.1, 20]]}
        for s in SITES
    },
    "admission": {s: {"status": "accepted", "reason": ""} for s in SITES},
}
NEW_BLOCKS = {  # the toolbox issue's blocks: unknown to the report, rendered generically
    "crosstab": {"table": [[12, 30], [40, 18]], "chi2": 17.3, "df": 1, "p": 3.2e-5, "fisher_p": 2.1e-5},
    "ttest": {"groups": {"0": {"n": 363, "mean": 38.8, "sd": 23.7}, "1": {"n": 345, "mean": 36.8, "sd": 23.3}},
              "student": {"t": 1.13, "df": 706, "p": 0.26}, "welch": {"t": 1.13, "df": 705.8, "p": 0.26}},
    "correlation": {"matrix": [[1.0, 0.12], [0.12, 1.0]], "covariance": [[552.0, 8.1], [8.1, 9.2]], "n": 628},
    "cif": {"groups": {"all": {"time": [365, 730], "cif": {"1": [0.01, 0.02], "2": [0.0, 0.01]}}}, "gray": None},
    "roc": {"auc": 0.97, "fpr": [0.0, 0.05, 0.2, 1.0], "tpr": [0.0, 0.8, 0.95, 1.0], "calibration": [[0.1, 0.08]]},
}  # fmt: skip

CASES = {
    "survival_km": _sums("survival_km", "km", KM),
    "cox_ph": _sums("cox_ph", "cox", COX),
    "glm": _sums("glm", "glm", GLM),
    "cohort_stats": _sums("cohort_stats", "statistics", STATS, suppression={"groups_withheld": ["x"]}),
    "breast_cancer_dp": TRAINING,
    "new_methods": _sums(
        "crosstab", "crosstab", NEW_BLOCKS["crosstab"], **{k: v for k, v in NEW_BLOCKS.items() if k != "crosstab"}
    ),
}


def _images(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page)


@pytest.mark.parametrize("kind", list(CASES))
def test_every_job_kind_gets_a_self_contained_report(tmp_path, kind):
    path = write_report(CASES[kind], tmp_path)
    page = path.read_text()
    assert path.name == "report.html" and page.startswith("<!DOCTYPE html>")
    # nothing fetched: no script, no external source or stylesheet, every image inline
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)
    for data in re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page):
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Admission" in page and "site-3" in page


def test_each_figure_fits_its_job():
    km, cox, glm = (render_report(CASES[k]) for k in ("survival_km", "cox_ph", "glm"))
    assert _images(km) == ["Kaplan–Meier curves with numbers at risk"]
    assert "log-rank test: χ² = 0.1432, df = 1, p = 0.705" in km and "median survival not reached" in km
    assert _images(cox) == ["forest plot of hazard ratios"]
    assert _images(glm) == ["forest plot of GLM coefficients"]
    # the analytics jobs get no training-shaped per-round figure and no "final global model" line
    for page in (km, cox, glm):
        assert not any("per round" in alt for alt in _images(page)) and "global model" not in page
    assert _images(render_report(TRAINING)) == ["auc and ε per round"]
    assert is_training(TRAINING) and not any(is_training(CASES[k]) for k in ("survival_km", "cox_ph", "glm"))


def test_tables_use_the_columns_statisticians_read():
    cox = render_report(CASES["cox_ph"])
    for col in ("exp(coef)", "se(coef)", "exp(coef) lower 95%", "exp(coef) upper 95%", "concordance = 0.55"):
        assert col in cox
    glm = render_report(CASES["glm"])
    for col in ("std err", "P&gt;|z|", "[0.025", "0.975]", "deviance = 488.8188", "&lt;0.005"):
        assert col in glm
    assert glm.index("<td class=l>intercept</td>") < glm.index("<td class=l>age</td>")  # statsmodels' order
    training = render_report(TRAINING)
    assert "ε per site" in training and "rdp" in training and "site budget" not in training.split("<h2>Rounds")[0]
    stats = render_report(CASES["cohort_stats"])
    assert "q75" in stats and "groups_withheld" in stats


def test_blocks_the_report_does_not_know_are_tables_not_errors():
    page = render_report(CASES["new_methods"])
    for key in ("crosstab", "ttest", "correlation", "cif"):
        assert f"<h2>{key}</h2>" in page
    assert "fisher_p" in page and "welch" in page and "covariance" in page
    assert _images(page) == ["ROC curve"]
    assert render_report({"job": "x", "weird": {"a": [{"b": [1, {"c": None}]}]}, "empty": {}})  # any JSON renders


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium installed")
@pytest.mark.parametrize("kind", ["survival_km", "glm"])
def test_report_renders_in_headless_chromium(tmp_path, kind):
    from PIL import Image

    page = write_report(CASES[kind], tmp_path)
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,1600",
         f"--screenshot={shot}", page.as_uri()],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert shot.is_file()
    image = Image.open(shot).convert("L")
    dark = sum(1 for v in image.getdata() if v < 128)
    assert image.size == (1200, 1600) and dark > 5000  # text, tables and the figure were drawn, not a blank page


def test_a_training_runs_pooled_roc_is_drawn_with_its_auc_and_calibration_or_its_reason():
    import numpy as np

    from clinfed.analytics.roc import fit_federated

    rng = np.random.default_rng(3)
    sites = {}
    for s in SITES:
        y = (rng.random(80) < 0.4).astype(int)
        sites[s] = (1 / (1 + np.exp(-(rng.normal(0, 1, 80) + 2 * y - 1))), y)
    roc = {"status": "ok", **fit_federated(sites, min_cell=5), "sites": SITES}
    page = render_report({**TRAINING, "roc": roc})
    assert _images(page) == ["ROC curve", "auc and ε per round"]
    assert "<h2>ROC</h2>" in page and "auc_resolution" in page and "mean_predicted" in page
    skipped = render_report({**TRAINING, "roc": {"status": "skipped", "reason": "site-1: task segmentation has no"}})
    assert _images(skipped) == ["auc and ε per round"] and "No ROC released (skipped): site-1: task" in skipped
