"""ttest: two-sample t-tests (Student and Welch) and one-way ANOVA of a numeric column by a group column.

Each site sends, encrypted, n, Σ(x − c) and Σ(x − c)² per level of the group (c: the public
reference dataset's mean); the release site withholds a level with fewer patients than the
minimum cell. Equal to scipy's `ttest_ind` (both variances) and `f_oneway` on the pooled table.
Run it:
`clinfed data split --dataset gbsg2 --sites 3 --out data/gbsg2` then
`clinfed simulate ttest --sites 3 --data-dir data/gbsg2 --variable age --group horTh`.
"""

from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.splits import check_split
from clinfed.analytics.stats import level_text
from clinfed.analytics.sums_fl import SumsRecipe

DEFAULTS = {"sites": 3, "rounds": 1, "min_cell": 5}
MAX_LEVELS = 20


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = None,
    data_dir: str | None = None,
    cohort_file: str | None = None,
    variable: str | None = None,
    group: str | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` is ignored (one round of sums and a release)."""
    if epsilon is not None:
        raise ValueError(
            "ttest has no output DP: one patient's share of Σx² has no public bound; run it without --epsilon"
        )
    if not variable or not group or variable == group:
        raise ValueError("ttest needs --variable COL (numeric) and --group COL (categorical)")
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    frame = check_split(manifest, sites, [variable, group], [variable], False)
    if frame is None:
        raise ValueError(
            "ttest needs --data-dir of a `clinfed data split` folder (the public levels and centre), or of a "
            "`clinfed data omop` folder with --cohort FILE"
        )
    levels = sorted({t for t in (level_text(v) for v in frame[group].tolist()) if t is not None})
    if not 2 <= len(levels) <= MAX_LEVELS:
        raise ValueError(f"--group {group} has {len(levels)} levels: a t-test or ANOVA needs 2 to {MAX_LEVELS}")
    method = {
        "method": "ttest",
        "variable": variable,
        "group": group,
        "levels": levels,
        "shift": round(float(frame[variable].mean()), 6),
    }
    return SumsRecipe(
        name="ttest",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
