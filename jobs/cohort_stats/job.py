"""cohort_stats: count, mean, std, median/q25/q75 and histograms per group and feature, pooled over all
sites under CKKS.

Groups: `all`, `malignant`, `benign` (the bundled breast-cancer label; a site's own CSV groups rows
by `group_column`). Two encrypted passes (sums, then Σ(x − mean)²) that the server only adds; one
site decrypts and releases, after small-cell suppression (`min_cell`, default 10) and, with
`epsilon`, output-DP noise. Bounds and bin edges are public: the bundled data's range, rounded out.
`cohort="intersect"` restricts every site to the patients linked by the `psi_linkage` job.
Run it: `clinfed simulate cohort_stats --sites 3 --out out/stats [--min-cell 300] [--epsilon 1]`.

What no argument here can change (`clinfed.analytics.stats_fl`): at least 3 sites (fewer is refused
here, and every site checks the count inside the sums); rows in no declared group are protected as
a group of their own; each site's release log refuses a release that, with an earlier one (another
cohort, site subset, group partition or bin grid), would make a withheld cell derivable; with
`epsilon`, every contributing site charges ε to its own privacy ledger first and refuses over its
budget; released means and std are rounded to 7 significant digits.

Quantiles come from a fine histogram (`quantile_bins`, default 200 bins over the public bounds, never
released) packed into pass 1 and are rounded to its grid: within 0.75 % of a feature's range of
np.quantile on the pooled rows. Some are null where placing them would tell something about a
withheld cell (`clinfed.analytics.stats.quantile_cells`); all are null under `epsilon` (output DP),
and then no fine histogram is packed. `quantile_bins=0` turns them off (pass 1 back to one ciphertext).
"""

from clinfed.analytics.stats import ALL, StatsSpec, reference_bounds
from clinfed.analytics.stats_fl import CohortStatsRecipe
from clinfed.data import breast_cancer as bc

# No "epsilon" here: simulate passes DEFAULTS["epsilon"] when the CLI gives none, and no ε means no noise.
DEFAULTS = {"sites": 3, "rounds": 3, "min_cell": 10, "bins": 10, "quantile_bins": 200}
GROUPS = {"malignant": bc.MALIGNANT, "benign": 1 - bc.MALIGNANT}  # value of the group column


def make_recipe(
    sites: int,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    min_cell: int | None = 10,
    cohort: str = "all",
    mechanism: str = "laplace",
    delta: float | None = None,
    bins: int = DEFAULTS["bins"],
    group_column: str = bc.LABEL_COLUMN,
    groups: dict | None = None,
    max_bins_percent: float | None = 10.0,
    features: list[str] | None = None,
    quantile_bins: int = DEFAULTS["quantile_bins"],
    **_: object,
) -> CohortStatsRecipe:
    """`rounds` is ignored (the job is always two passes and a release); `epsilon=None`: no noise.

    `features` picks a subset of the 30: under DP the noise of each family grows with the number of
    features released (one record touches all of them), so a DP release should ask for few.
    """
    table = bc.load_bundled()
    names = list(features or table.features)
    unknown = [f for f in names if f not in table.features]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; the bundled features are {table.features}")
    cols = [table.features.index(f) for f in names]
    group_values = dict(groups or GROUPS)
    fine = -(-int(quantile_bins) // bins) * bins  # a multiple of bins, so every coarse edge is a fine one
    spec = StatsSpec(
        features=tuple(names),
        bounds=tuple(reference_bounds(table.x[:, cols])),  # public: the reference data's documented range
        groups=(ALL, *group_values),
        bins=bins,
        quantile_bins=0 if epsilon is not None else fine,  # DP: the fine histogram is not noised
    )
    dp = None
    if epsilon is not None:
        dp = {
            "epsilon": float(epsilon),
            "mechanism": mechanism,
            "delta": delta or (1e-5 if mechanism == "gaussian" else 0.0),
        }
    return CohortStatsRecipe(
        name="cohort_stats",
        num_sites=sites,
        spec=spec,
        group_values=group_values,
        group_column=group_column,
        encrypt=encrypt,
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        max_bins_percent=max_bins_percent,
        dp=dp,
        cohort=cohort,
    )
