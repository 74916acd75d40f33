"""survival_km: Kaplan–Meier curves per group, log-rank test and median survival, pooled over sites under CKKS.

Event times are rounded up to `time_bin`-day bins; each site sends, encrypted, its events and
censorings per group and bin; the release site merges bins (or truncates the tail) until every
released count is 0 or ≥ the minimum cell, and says which. Equal to lifelines on the pooled, binned
table. Run it:
`clinfed data split --dataset gbsg2 --sites 3 --out data/gbsg2` then
`clinfed simulate survival_km --sites 3 --data-dir data/gbsg2 --group horTh --time-bin 30 --min-cell 5`.

The groups (`levels`) and the horizon (the last bin) are agreed before any count leaves a site:
read from the bundled dataset a `clinfed data split` folder names in its split.json, or given.

`--epsilon E` (optional output DP, δ = 1e-5 unless `delta` is given): the release site adds
Gaussian noise (Δ₂ = 1: a patient is one event or one censoring in one bin) to the summed counts
before the curves are derived; every site reserves the spend in its own ledger first and refuses
the job when its policy or budget cannot take it.
"""

from clinfed.analytics.km import n_bins_for
from clinfed.analytics.methods import KaplanMeier, dp_config, level_text
from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.sums_fl import SumsRecipe, check_split

DEFAULTS = {"sites": 3, "rounds": 1, "min_cell": 5, "time_bin": 30}


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = None,
    data_dir: str | None = None,
    cohort_file: str | None = None,
    group: str | None = None,
    time_bin: float | None = None,
    levels: list[str] | None = None,
    horizon: float | None = None,
    delta: float | None = None,
    straggler_wait: int | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` is ignored (one round of counts and a release); `group=None`: one curve of everyone."""
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    time_bin = float(time_bin or DEFAULTS["time_bin"])
    if time_bin <= 0:
        raise ValueError(f"--time-bin must be positive, got {time_bin:g}")
    group = None if group in (None, "", "none") else group
    frame = check_split(manifest, sites, ["time", "event", *([group] if group else [])], [], False)
    if frame is not None:
        horizon = horizon or float(frame["time"].max())
        if group and levels is None:
            levels = sorted({level_text(v) for v in frame[group].dropna()})
    if horizon is None or (group and not levels):
        raise ValueError(
            "survival_km needs --data-dir of a `clinfed data split` folder, or explicit levels and horizon"
        )
    method = {
        "method": "km",
        "group": group,
        "levels": [str(v) for v in levels] if group else None,
        "time_bin": time_bin,
        "n_bins": n_bins_for(float(horizon), time_bin),
    }
    if epsilon is not None:
        method["dp"] = dp_config("survival_km", KaplanMeier.dp_sensitivity, epsilon, delta or 1e-5)
    return SumsRecipe(
        name="survival_km",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
        **({} if straggler_wait is None else {"straggler_wait": int(straggler_wait)}),
    )
