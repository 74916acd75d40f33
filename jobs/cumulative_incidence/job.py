"""cumulative_incidence: Aalen–Johansen cumulative incidence with competing risks, per group, under CKKS.

Event times are rounded up to `time_bin`-day bins; each site sends, encrypted, its events of each
cause and its censorings per group and bin; the release site merges bins until every released count
is 0 or ≥ the minimum cell (as survival_km does). Equal to lifelines' `AalenJohansenFitter` on the
pooled, binned table; across groups, per cause, the cause-specific log-rank test (the score test
of a cause-specific Cox model), as lifelines' `multivariate_logrank_test`.

Causes come from a column naming each event's cause: `--cause COL:LEVEL[,LEVEL...]` names the causes
reported apart; every other event is cause ``other``. flchain has no bundled competing-risks
outcome, so one is derived from its cause of death (`chapter`). Run it:
`clinfed data split --dataset flchain --sites 3 --out data/flchain` then
`clinfed simulate cumulative_incidence --sites 3 --data-dir data/flchain --group sex
--cause chapter:Circulatory,Neoplasms --time-bin 30`.
`--epsilon E`: output DP (Δ₂ = 1: a patient is one count), charged to every site's ledger.
"""

from clinfed.analytics.cif import OTHER
from clinfed.analytics.km import n_bins_for
from clinfed.analytics.methods import dp_config, level_text
from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.splits import check_split
from clinfed.analytics.sums_fl import SumsRecipe
from clinfed.analytics.toolbox_methods import CumulativeIncidence

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
    cause: str | None = None,
    time_bin: float | None = None,
    delta: float | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` is ignored (one round of counts and a release); `group=None`: one set of curves of everyone."""
    column, sep, named = (cause or "").partition(":")
    causes = [c.strip() for c in named.split(",") if c.strip()]
    if not column.strip() or not sep or not causes:
        raise ValueError("cumulative_incidence needs --cause COL:LEVEL[,LEVEL...] (the cause column and named causes)")
    column = column.strip()
    time_bin = float(time_bin or DEFAULTS["time_bin"])
    group = None if group in (None, "", "none") else group
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    frame = check_split(manifest, sites, ["time", "event", column, *([group] if group else [])], [], False)
    if frame is None:
        raise ValueError(
            "cumulative_incidence needs --data-dir of a `clinfed data split` folder, or of a "
            "`clinfed data omop` folder with --cohort FILE"
        )
    known = sorted({t for t in (level_text(v) for v in frame.loc[frame["event"] > 0, column]) if t is not None})
    unknown = [c for c in causes if c not in known]
    if unknown or OTHER in causes or len(set(causes)) != len(causes):
        raise ValueError(
            f"{unknown[0] if unknown else OTHER!r} is not a cause in {column} (causes: {', '.join(known)})"
        )
    levels = sorted({level_text(v) for v in frame[group].dropna()}) if group else None
    method = {
        "method": "cif",
        "cause": column,
        "causes": [*causes, OTHER],
        "group": group,
        "levels": levels,
        "time_bin": time_bin,
        "n_bins": n_bins_for(float(frame["time"].max()), time_bin),
    }
    if epsilon is not None:
        method["dp"] = dp_config("cumulative_incidence", CumulativeIncidence.dp_sensitivity, epsilon, delta or 1e-5)
    return SumsRecipe(
        name="cumulative_incidence",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
