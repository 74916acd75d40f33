"""cohort_stats: count, mean, std, median/q25/q75 and histograms per group and feature, proportions
per level of categorical columns and an incidence rate, pooled over all sites under CKKS.

Two encrypted passes (sums, then Σ(x − mean)²) that the server only adds; one site decrypts them,
sends the means back encrypted between the passes, and releases after small-cell suppression
(`min_cell`, default 10) and, with `epsilon`, output-DP noise. It is the `cohort` method of the one
encrypted-sums job (`clinfed.analytics.sums_fl.SumsRecipe`, `clinfed.analytics.cohort_method`).
Bounds, bin edges and category levels are public: a reference dataset's, rounded out.
`cohort="intersect"` restricts every site to the patients linked by the `psi_linkage` job.

Two kinds of data:

* the bundled breast-cancer rows (no `data_dir`) or each site's own `data.csv`: groups `all`,
  `malignant`, `benign` by `group_column` (the label). Run it:
  `clinfed simulate cohort_stats --sites 3 --out out/stats [--min-cell 300] [--epsilon 1]`.
* a `clinfed data split` folder (`data_dir` holding `<site>.sqlite` and split.json): each site reads
  its variables by name from its database; `features` (default: the dataset's numeric covariates),
  `group` (or `group_column`: groups are `all` and each level, or the `groups` given),
  `proportions` (categorical columns: count, proportion and exact Clopper–Pearson 95 % CI per group
  and level) and `rate` ("EVENT:TIME": events per `rate_per` units of person-time, exact Poisson
  95 % CI), all checked against, and bounded by, the bundled dataset split.json names. Run it:
  `clinfed data split --dataset whas500 --sites 3 --out data/whas500` then
  `clinfed simulate cohort_stats --data-dir data/whas500 --features age,bmi --group gender
  --proportions chf,miord --rate event:time --rate-per 1000 --out out/whas500`.

What no argument here can change (`clinfed.analytics.sums_fl`, `cohort_method`): at least 3 sites
(fewer is refused here, and the release site checks the count inside the sums); every job runs
under CKKS; rows in no declared group are protected as a group of their own; each site's release
log refuses a release that, with an earlier one (another cohort, site subset, group partition or
bin grid), would make a withheld cell derivable; with `epsilon`, every site admits or refuses the
whole job against its budget and `max_job_epsilon`, and charges ε to its own privacy ledger before
its rows leave; released means and std are rounded to 7 significant digits. Proportions and rates
are not in the DP noise plan: asking for them with `epsilon` is refused here.

Quantiles come from a fine histogram (`quantile_bins`, default 200 bins over the public bounds, never
released) packed into pass 1 and are rounded to its grid: within 0.75 % of a feature's range of
np.quantile on the pooled rows. Some are null where placing them would tell something about a
withheld cell (`clinfed.analytics.stats.quantile_cells`); all are null under `epsilon` (output DP),
and then no fine histogram is packed. `quantile_bins=0` turns them off (pass 1 back to one ciphertext).
"""

from clinfed.analytics.cohort_data import clinical_layout
from clinfed.analytics.omop_source import job_manifest, method_fields
from clinfed.analytics.stats import ALL, EXTRAS_UNDER_DP, StatsSpec, reference_bounds
from clinfed.analytics.sums_fl import SumsRecipe
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
    group_column: str | None = None,
    groups: dict | list | None = None,
    max_bins_percent: float | None = 10.0,
    features: list[str] | str | None = None,
    quantile_bins: int = DEFAULTS["quantile_bins"],
    data_dir: str | None = None,
    cohort_file: str | None = None,
    group: str | None = None,
    proportions: list[str] | str | None = None,
    rate: tuple[str, str] | str | None = None,
    rate_per: float | None = None,
    rate_unit: str | None = None,
    **_: object,
) -> SumsRecipe:
    """`rounds` is ignored (the job is always two passes and a release); `epsilon=None`: no noise.

    `features` picks a subset (bundled: of the 30): under DP the noise of each family grows with the
    number of features released (one record touches all of them), so a DP release should ask for few.
    `group` is the CLI's name for `group_column`. Lists may be given as comma-separated text.
    """
    manifest = job_manifest(data_dir, cohort_file)  # split.json, or a CDM folder's with its cohort
    fine = -(-int(quantile_bins) // bins) * bins  # a multiple of bins, so every coarse edge is a fine one
    fine = 0 if epsilon is not None else fine  # DP: the fine histogram is not noised
    if epsilon is not None and (proportions or rate):  # before any data is looked at
        raise ValueError(EXTRAS_UNDER_DP)
    if manifest is not None:  # a `clinfed data split` folder: the sites read their databases
        column = group or group_column
        spec, group_values = clinical_layout(
            manifest,
            sites,
            features=features,
            group=column,
            groups=groups,
            proportions=proportions,
            rate=rate,
            rate_per=rate_per,
            rate_unit=rate_unit,
            bins=bins,
            quantile_bins=fine,
        )
        column = column or ""
    else:
        if proportions or rate:
            raise ValueError(
                "proportions and rates need --data-dir of a `clinfed data split` folder (its dataset names the levels)"
            )
        table = bc.load_bundled()
        names = [f.strip() for f in features.split(",")] if isinstance(features, str) else list(features or [])
        names = names or list(table.features)
        unknown = [f for f in names if f not in table.features]
        if unknown:
            raise ValueError(f"unknown feature(s) {unknown}; the bundled features are {table.features}")
        cols = [table.features.index(f) for f in names]
        group_values = dict(groups or GROUPS)
        column = group or group_column or bc.LABEL_COLUMN
        spec = StatsSpec(
            features=tuple(names),
            bounds=tuple(reference_bounds(table.x[:, cols])),  # public: the reference data's documented range
            groups=(ALL, *group_values),
            bins=bins,
            quantile_bins=fine,
        )
    method = {
        "method": "cohort",
        "spec": spec.to_dict(),
        "group_values": dict(group_values),
        "group_column": column,
        "cohort": cohort,
        "max_bins_percent": max_bins_percent,
        "dp": None,
    }
    if epsilon is not None:
        method["dp"] = {
            "epsilon": float(epsilon),
            "mechanism": mechanism,
            "delta": delta or (1e-5 if mechanism == "gaussian" else 0.0),
        }
    return SumsRecipe(
        name="cohort_stats",
        num_sites=sites,
        method={**method, **method_fields(manifest)},
        min_cell=DEFAULTS["min_cell"] if min_cell is None else int(min_cell),
        encrypt=encrypt,
    )
