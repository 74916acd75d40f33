"""glm: logistic, linear and Poisson regression by IRLS on encrypted summed X'WX and X'Wz.

Equal to statsmodels' GLM on the pooled table (canonical links). DataSHIELD-grade guards at every
site before it sends anything: refused when the parameters exceed 0.33 × its n, or a binary outcome
or covariate level has fewer rows than the minimum cell. Run it:
`clinfed data split --dataset breast_cancer --sites 3 --out data/bc` then
`clinfed simulate glm --sites 3 --data-dir data/bc --family binomial --outcome malignant
--covariates mean_radius,mean_texture`.
"""

from clinfed.analytics.glm import FAMILIES
from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.sums_fl import SumsRecipe, check_split

DEFAULTS = {"sites": 3, "rounds": 25, "min_cell": 5}


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = None,
    data_dir: str | None = None,
    cohort_file: str | None = None,
    family: str = "binomial",
    outcome: str | None = None,
    covariates: list[str] | None = None,
    offset: str | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` caps the IRLS iterations (≤ 25); `offset` names a column on the log scale, or `log(COL)` the
    log of an exposure column (Poisson rates: `--family poisson --offset 'log(time)'`, incidence-rate ratios)."""
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    if epsilon is not None:
        raise ValueError(
            "glm has no output DP: one patient's share of its summed gradients has no public bound "
            "(offered for survival_km and cohort_stats); run it without --epsilon"
        )
    if family not in FAMILIES:
        raise ValueError(f"--family must be one of {', '.join(FAMILIES)}, got {family!r}")
    covariates = list(covariates or [])
    if not outcome or not covariates:
        raise ValueError("glm needs --outcome COL and --covariates a,b,c")
    if outcome in covariates or len(set(covariates)) != len(covariates):
        raise ValueError(f"the outcome or a covariate is named twice in {[outcome, *covariates]}")
    offset_log = bool(offset) and offset.startswith("log(") and offset.endswith(")")
    if offset_log:  # `--offset log(time)`: the log of an exposure column (incidence-rate ratios)
        offset = offset[4:-1].strip()
    numeric = [outcome, *covariates, *([offset] if offset else [])]
    check_split(manifest, sites, numeric, numeric, False)
    method = {
        "method": "glm",
        "family": family,
        "outcome": outcome,
        "covariates": covariates,
        "offset": offset,
        "max_iter": min(int(rounds or 25), 25),
        "start": "data",  # the first IRLS step from the data, as R's glm (`glm.start_mean`): fewer rounds
    }
    if offset_log:
        method["offset_log"] = True
    return SumsRecipe(
        name="glm",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
