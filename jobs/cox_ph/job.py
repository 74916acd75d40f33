"""cox_ph: Cox proportional hazards (Efron ties) by Newton–Raphson on encrypted summed gradients and Hessians.

`strata="site"` (default): one baseline hazard per site on exact times, equal to lifelines'
``CoxPHFitter().fit(df, strata=["site"])``. `strata="none"`: one baseline over `time_bin`-day bins
(equal to lifelines on the pooled, binned table). The server only adds ciphertexts and forwards
β encrypted by the release site; it sees the released table (coef, SE, HR and CI, p, log-likelihood,
iterations, concordance). Run it:
`clinfed data split --dataset flchain --sites 5 --out data/flchain` then
`clinfed simulate cox_ph --sites 5 --data-dir data/flchain --covariates age,creatinine,kappa,lambda`.
"""

from clinfed.analytics.km import n_bins_for
from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.sums_fl import SumsRecipe, check_split

DEFAULTS = {"sites": 3, "rounds": 25, "min_cell": 5, "time_bin": 30}


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = None,
    data_dir: str | None = None,
    cohort_file: str | None = None,
    covariates: list[str] | None = None,
    strata: str | None = "site",
    time_bin: float | None = None,
    horizon: float | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` caps the Newton iterations (≤ 25)."""
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    if epsilon is not None:
        raise ValueError(
            "cox_ph has no output DP: one patient's share of its summed gradients has no public bound "
            "(offered for survival_km and cohort_stats); run it without --epsilon"
        )
    covariates = list(covariates or [])
    if not covariates:
        raise ValueError("cox_ph needs --covariates a,b,c")
    if len(set(covariates)) != len(covariates):
        raise ValueError(f"a covariate is named twice in {covariates}")
    strata = None if strata in (None, "", "none") else strata
    if strata not in (None, "site"):
        raise ValueError(f"--strata must be 'site' or 'none', got {strata!r}")
    frame = check_split(manifest, sites, ["time", "event", *covariates], covariates, True)
    method: dict = {
        "method": "cox",
        "covariates": covariates,
        "strata": strata,
        "max_iter": min(int(rounds or 25), 25),
    }
    if strata is None:
        method["time_bin"] = float(time_bin or DEFAULTS["time_bin"])
        if frame is not None:
            horizon = horizon or float(frame["time"].max())
        if horizon is None:
            raise ValueError("a pooled cox_ph needs --data-dir of a `clinfed data split` folder, or a horizon")
        method["n_bins"] = n_bins_for(float(horizon), method["time_bin"])
    return SumsRecipe(
        name="cox_ph",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
