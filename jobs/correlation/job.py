"""correlation: Pearson correlation and covariance matrices of numeric columns, with n per pair.

Each site sends, encrypted, six sums per pair of variables over the rows where both are present
(shifted by the public reference dataset's means); a pair with fewer rows than the minimum cell is
withheld. Equal to pandas' pairwise-complete `DataFrame.corr()` and `.cov()` on the pooled table.
Run it:
`clinfed data split --dataset flchain --sites 3 --out data/flchain` then
`clinfed simulate correlation --sites 3 --data-dir data/flchain --variables age,kappa,lambda,creatinine`.
"""

from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.splits import check_split
from clinfed.analytics.sums_fl import SumsRecipe

DEFAULTS = {"sites": 3, "rounds": 1, "min_cell": 5}
MAX_VARIABLES = 30


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = None,
    data_dir: str | None = None,
    cohort_file: str | None = None,
    variables: str | list[str] | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` is ignored (one round of sums and a release)."""
    if epsilon is not None:
        raise ValueError(
            "correlation has no output DP: one patient's share of Σxy has no public bound; run it without --epsilon"
        )
    names = [v.strip() for v in variables.split(",")] if isinstance(variables, str) else list(variables or [])
    names = [n for n in names if n]
    if len(names) < 2 or len(set(names)) != len(names) or len(names) > MAX_VARIABLES:
        raise ValueError(f"correlation needs 2 to {MAX_VARIABLES} different columns: --variables A,B,C")
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    frame = check_split(manifest, sites, names, names, False)
    if frame is None:
        raise ValueError(
            "correlation needs --data-dir of a `clinfed data split` folder (the public centres), or of a "
            "`clinfed data omop` folder with --cohort FILE"
        )
    method = {
        "method": "correlation",
        "variables": names,
        "shift": [round(float(frame[n].mean()), 6) for n in names],
    }
    return SumsRecipe(
        name="correlation",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
