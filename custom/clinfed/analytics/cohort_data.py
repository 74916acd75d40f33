"""Where `cohort_stats` rows come from, and the public layout of a job over them (no statistics here).

A site describes one of three sources, picked by its local policy (`clinfed.fl.participant.SitePolicy`):

* its database: the policy's ``database`` (SQLAlchemy URL + column mapping) or the `<site>.sqlite` of a
  `clinfed data split` folder named by ``data_dir`` (`clinfed.data.source.site_table`: variables by
  name, never SQL);
* its own ``data.csv`` in ``data_dir`` (:func:`read_cohort_csv`);
* neither: its part of the bundled breast-cancer demo rows (a Dirichlet split, or with the
  ``intersect`` cohort the overlapping registries `psi_linkage` links).

With ``cohort="intersect"`` only the rows whose identifier is in the site's last PSI result
(`clinfed.analytics.psi.read_intersection`) are kept. Kept apart from `stats` (numpy arithmetic
only) and from the FLARE components (`sums_fl`), so each can be read and tested alone.

:func:`clinical_layout` is the submission side: the features, groups, levels and public bounds of
a job over a `clinfed data split` folder, all read from the bundled reference dataset it names.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clinfed.analytics import stats
from clinfed.data import breast_cancer as bc
from clinfed.errors import SiteDataError, SiteRefusal

if TYPE_CHECKING:
    from clinfed.fl.participant import SitePolicy

COHORTS = ("all", "intersect")
MISSING = {"", "na", "nan", "null", "none"}


# --- the site's table ---------------------------------------------------------------------------------------
def _cell_float(site: str, path: Path, line: int, column: str, text: str) -> float:
    if text is None or text.strip().lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise SiteDataError(f"{site}: {path} line {line}, column '{column}': '{text}' is not a number") from None


def read_cohort_csv(
    site: str,
    data_dir: str | Path,
    features: list[str],
    group_column: str,
    id_column: str | None = None,
    other_columns: list[str] | None = None,
) -> tuple[np.ndarray, list[str], list[str] | None] | tuple[np.ndarray, list[str], list[str] | None, dict]:
    """(values, group labels, ids) from the site's `<data_dir>/data.csv` (or its only CSV); with
    ``other_columns`` (proportion and rate columns) a fourth item, {column: cells as text, None missing}.

    Empty or NA cells are missing values (skipped per feature); a missing *column* is an error that
    names the site and the column, since every site must summarise the same features. An empty
    ``group_column`` puts every row in ``all`` only.
    """
    path = bc.find_site_csv(site, data_dir)
    others = list(other_columns or [])
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        needed = [*features, *([group_column] if group_column else []), *([id_column] if id_column else []), *others]
        for col in needed:
            if col not in header:
                raise SiteDataError(f"{site}: {path} lacks column '{col}'")
        rows = list(reader)
    x = np.array(
        [[_cell_float(site, path, i, f, r[f]) for f in features] for i, r in enumerate(rows, start=2)],
        dtype=np.float64,
    ).reshape(len(rows), len(features))
    labels = [(r[group_column] or "").strip() if group_column else "" for r in rows]
    ids = [(r[id_column] or "").strip() for r in rows] if id_column else None
    if other_columns is None:
        return x, labels, ids
    extra = {c: [None if (r[c] or "").strip().lower() in MISSING else r[c].strip() for r in rows] for c in others}
    return x, labels, ids, extra


def read_cohort_db(
    site: str,
    policy: SitePolicy,
    features: list[str],
    group_column: str,
    id_column: str | None,
    others: list[str],
    omop_cohort: dict | None = None,
) -> tuple[np.ndarray, list[str], list[str] | None, dict]:
    """(values, group labels, ids, {column: values}) from the site's database: its policy's ``database``
    (SQLAlchemy URL + column mapping) or the `<site>.sqlite` of a `clinfed data split` folder, through
    `clinfed.data.source.site_table`: variables by name, never SQL."""
    from clinfed.data.source import site_table

    wanted = [*features, *([group_column] if group_column else []), *([id_column] if id_column else []), *others]
    table = site_table(policy, site, list(dict.fromkeys(wanted)), cohort=omop_cohort)
    n = len(next(iter(table.values())))
    cols = []
    for f in features:
        try:
            cols.append(stats.numeric_column(table[f], f))
        except ValueError as exc:
            raise SiteDataError(f"{site}: {exc} in its database") from None
    x = np.column_stack(cols) if cols else np.zeros((n, 0))
    labels = [stats.level_text(v) or "" for v in table[group_column]] if group_column else [""] * n
    ids = [stats.level_text(v) or "" for v in table[id_column]] if id_column else None
    return x, labels, ids, {c: table[c] for c in others}


def _same(label: str, value: object) -> bool:
    try:
        return float(label) == float(value)  # "1", "1.0" and 1 are one group
    except (TypeError, ValueError):
        return label == str(value)


def group_masks(labels: list, spec: stats.StatsSpec, group_values: dict) -> dict[str, np.ndarray]:
    """Row masks per group: "all" is every row; each other group the rows whose label equals its value."""
    n = len(labels)
    masks = {stats.ALL: np.ones(n, dtype=bool)}
    for g in spec.groups[1:]:
        masks[g] = np.array([_same(str(label), group_values[g]) for label in labels], dtype=bool).reshape(n)
    return masks


@dataclass
class CohortRows:
    """One site's rows for `cohort_stats`: values (n, F), group labels, the proportion/rate columns."""

    x: np.ndarray
    labels: list
    columns: dict = field(default_factory=dict)
    origin: str = ""


def load_cohort(
    site: str,
    policy: SitePolicy,
    root: Path,
    spec: stats.StatsSpec,
    group_column: str,
    num_sites: int,
    cohort: str = "all",
    id_column: str = "patient_id",
    site_number: int | None = None,
    omop_cohort: dict | None = None,
) -> CohortRows:
    """The site's rows from its database, its CSV or its bundled share (module doc), restricted to the
    PSI-linked patients for ``cohort="intersect"``. One-line SiteDataError/SiteRefusal naming the site."""
    from clinfed.analytics import psi
    from clinfed.data.sitedb import find_site_databases

    if cohort not in COHORTS:
        raise SiteRefusal(f"{site}: unknown cohort '{cohort}' (known: {', '.join(COHORTS)})")
    features = list(spec.features)
    others = [*(c for c, _ in spec.proportions), *(spec.rate or ())]
    columns: dict[str, Any] = {}
    wanted = psi.read_intersection(root, site) if cohort == "intersect" else None
    id_col = id_column if wanted is not None else None
    database = getattr(policy, "database", None)
    dbs = find_site_databases(policy.data_dir) if policy.data_dir else {}
    if database is not None or site in dbs:
        x, labels, ids, columns = read_cohort_db(site, policy, features, group_column, id_col, others, omop_cohort)
        origin = "its database" if site not in dbs else f"{dbs[site]}"
    elif policy.data_dir:
        x, labels, ids, columns = read_cohort_csv(site, policy.data_dir, features, group_column, id_col, others)
        origin = f"{policy.data_dir}"
    else:
        if site_number is None or not 0 <= site_number < num_sites:
            raise SiteRefusal(f"{site}: no data_dir in local/resources.json and no bundled split for this name")
        if others:
            raise SiteDataError(f"{site}: the bundled data has no column '{others[0]}'")
        table = bc.load_bundled()
        if group_column != bc.LABEL_COLUMN:
            raise SiteDataError(f"{site}: the bundled data has no column '{group_column}'")
        if wanted is None:
            rows = bc.dirichlet_split(table.y, num_sites)[site_number]
        else:
            rows = np.asarray(psi.registry_rows(site_number, num_sites, len(table.y)))
        unknown = [f for f in features if f not in table.features]
        if unknown:
            raise SiteDataError(f"{site}: the bundled data has no column '{unknown[0]}'")
        cols = [table.features.index(f) for f in features]
        x, labels, ids = table.x[np.ix_(rows, cols)], table.y[rows].tolist(), psi.patient_ids(rows)
        origin = f"bundled rows, site {site_number + 1}/{num_sites}"
    if wanted is not None:
        keep = np.array([i in wanted for i in ids], dtype=bool).reshape(len(ids))
        x, labels = x[keep], [lab for lab, k in zip(labels, keep, strict=True) if k]
        columns = {c: np.asarray(v, dtype=object)[keep] for c, v in columns.items()}
        origin += f", restricted to the {int(keep.sum())} rows linked by PSI"
    return CohortRows(x=x, labels=labels, columns=columns, origin=origin)


# --- the layout of a job on a `clinfed data split` folder ----------------------------------------------------
#: most distinct values a group or proportion column may have to count as categorical
MAX_LEVELS = 20


def _names(value: object) -> list[str]:
    """A list of column names from a list or a comma-separated string (as the CLI gives them)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _public_levels(frame, column: str, dataset: str) -> list[str]:
    """The sorted public levels of a categorical column of the reference dataset; refuses a continuous one."""
    levels = sorted({t for t in (stats.level_text(v) for v in frame[column].tolist()) if t is not None})
    if not levels:
        raise ValueError(f"column '{column}' of {dataset} has no values")
    if len(levels) > MAX_LEVELS:
        raise ValueError(
            f"column '{column}' of {dataset} has {len(levels)} distinct values: not categorical "
            f"(at most {MAX_LEVELS} levels)"
        )
    return levels


def clinical_layout(
    manifest: dict,
    sites: int,
    features: object = None,
    group: str | None = None,
    groups: object = None,
    proportions: object = None,
    rate: object = None,
    rate_per: float | None = None,
    rate_unit: str | None = None,
    bins: int = 10,
    quantile_bins: int = 0,
) -> tuple[stats.StatsSpec, dict]:
    """(spec, group values) of a `cohort_stats` job on a split of bundled dataset ``manifest["dataset"]``.

    Everything here is public: the variables and levels come from the bundled reference dataset the
    split names, the bounds are its ranges rounded out (`stats.reference_bounds`), the person-time
    bound its largest time rounded up; no site's data is read. ``features`` default to the dataset's
    numeric covariates; ``groups`` (levels of ``group``, default all of them) as a list or
    {name: value}; ``proportions`` categorical columns; ``rate`` "EVENT:TIME" or (event, time).
    One-line ValueErrors name the unknown column or the non-numeric / non-categorical one.
    """
    from clinfed.analytics.splits import check_split
    from clinfed.data.clinical import OUTCOME

    name = manifest["dataset"]
    group = None if group in (None, "", "none") else str(group)
    props = _names(proportions)
    if isinstance(rate, str):
        event, sep, time_col = rate.partition(":")
        if not sep or not event.strip() or not time_col.strip():
            raise ValueError(f"rate must be EVENT:TIME (two columns), got '{rate}'")
        rate = (event.strip(), time_col.strip())
    rate = tuple(rate) if rate else None
    if rate is not None and len(rate) != 2:
        raise ValueError(f"rate must name an event and a time column, got {list(rate)}")
    asked = _names(features)
    columns = [*asked, *([group] if group else []), *props, *(rate or ())]
    frame = check_split(manifest, sites, columns, asked, False)
    numeric = [c for c in frame.columns if frame[c].dtype.kind in "biuf"]
    names = asked or [c for c in numeric if c not in ("time", OUTCOME.get(name), group, *props, *(rate or ()))]
    if not names:
        raise ValueError(f"{name} has no numeric covariate to summarise: give features")
    bounds = stats.reference_bounds(frame[names].to_numpy(dtype=np.float64))
    if group:
        public = _public_levels(frame, group, name)
        if groups is None:
            group_values = {lv: lv for lv in public}
        elif isinstance(groups, dict):
            group_values = {str(k): stats.level_text(v) for k, v in groups.items()}
        else:
            group_values = {lv: lv for lv in _names(groups)}
        unknown = [v for v in group_values.values() if v not in public]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a level of {group} in {name} (levels: {', '.join(public)})")
        if stats.ALL in group_values:
            raise ValueError(f"a group may not be named '{stats.ALL}'")
    else:
        group_values = {}
    rate_bound, per = 1.0, float(rate_per or 1.0)
    if rate is not None:
        event, time_col = rate
        try:
            ev = stats.numeric_column(frame[event].to_numpy(), event)
            tt = stats.numeric_column(frame[time_col].to_numpy(), time_col)
        except ValueError as exc:
            raise ValueError(f"{exc} in {name}") from None
        if not np.isin(ev[~np.isnan(ev)], (0.0, 1.0)).all():
            raise ValueError(f"event column '{event}' of {name} is not 0/1")
        if (tt[~np.isnan(tt)] < 0).any():
            raise ValueError(f"time column '{time_col}' of {name} has negative values")
        rate_bound = stats.nice_bounds(0.0, float(np.nanmax(tt)))[1]
        if not (math.isfinite(per) and per > 0):
            raise ValueError(f"rate_per must be a positive number, got {rate_per}")
    spec = stats.StatsSpec(
        features=tuple(names),
        bounds=tuple(bounds),
        groups=(stats.ALL, *group_values),
        bins=bins,
        quantile_bins=quantile_bins,
        proportions=tuple((c, tuple(_public_levels(frame, c, name))) for c in props),
        rate=rate,
        rate_bound=rate_bound,
        rate_per=per,
        rate_unit=rate_unit if rate_unit is not None else _default_unit(name, rate),
    )
    return spec, group_values


def _default_unit(dataset: str, rate: tuple[str, str] | None) -> str:
    """The bundled survival datasets keep ``time`` in days (`clinfed.data.clinical`); otherwise the column's unit."""
    if rate is None:
        return ""
    return "person-days" if rate[1] == "time" and dataset != "breast_cancer" else f"person-time in {rate[1]} units"
