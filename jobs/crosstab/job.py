"""crosstab: an r×c contingency table of two categorical columns with Pearson's χ² (Fisher's exact test for 2×2).

Each site sends, encrypted, its cell counts over the public levels of both columns; the release
site releases the pooled table only when every cell is 0 or ≥ the minimum cell. Equal to
scipy's `chi2_contingency` (Yates' correction at df = 1) and `fisher_exact` on the pooled table.
Run it:
`clinfed data split --dataset gbsg2 --sites 3 --out data/gbsg2` then
`clinfed simulate crosstab --sites 3 --data-dir data/gbsg2 --rows horTh --cols tgrade`.
`--epsilon E`: output DP (Δ₂ = 1, a patient is one cell), charged to every site's ledger.
"""

from clinfed.analytics.methods import dp_config
from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.splits import check_split
from clinfed.analytics.stats import level_text
from clinfed.analytics.sums_fl import SumsRecipe
from clinfed.analytics.toolbox_methods import CrossTab

DEFAULTS = {"sites": 3, "rounds": 1, "min_cell": 5}
MAX_LEVELS = 20


def _levels(frame, column: str) -> list[str]:
    levels = sorted({t for t in (level_text(v) for v in frame[column].tolist()) if t is not None})
    if len(levels) > MAX_LEVELS:
        raise ValueError(f"column {column!r} has {len(levels)} distinct values: not categorical (at most {MAX_LEVELS})")
    return levels


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = None,
    data_dir: str | None = None,
    cohort_file: str | None = None,
    rows: str | None = None,
    cols: str | None = None,
    delta: float | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` is ignored (one round of counts and a release)."""
    if not rows or not cols or rows == cols:
        raise ValueError("crosstab needs two different columns: --rows COL --cols COL")
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    frame = check_split(manifest, sites, [rows, cols], [], False)
    if frame is None:
        raise ValueError(
            "crosstab needs --data-dir of a `clinfed data split` folder (the public levels), or of a "
            "`clinfed data omop` folder with --cohort FILE"
        )
    method = {
        "method": "crosstab",
        "rows": rows,
        "cols": cols,
        "row_levels": _levels(frame, rows),
        "col_levels": _levels(frame, cols),
    }
    if epsilon is not None:
        method["dp"] = dp_config("crosstab", CrossTab.dp_sensitivity, epsilon, delta or 1e-5)
    return SumsRecipe(
        name="crosstab",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
