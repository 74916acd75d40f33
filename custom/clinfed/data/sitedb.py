"""Per-site patient databases: split a bundled dataset into one SQLite file per site, and read a
site's variables back by name.

Why a database and variable names: a hospital's data lives in a database (PostgreSQL, an OMOP CDM
view), not in the job. A job names variables (``time``, ``event``, ``age``); the site's own policy
says where they are: an SQLAlchemy URL, a table and a {variable: column} mapping. So no job ever
carries a table name or SQL, and a site can rename or hide a column without touching the job.
SQLite through the standard library is the embedded default and what ``clinfed data split`` writes.

The split is what the simulator's sites hold: `DIR/site-K.sqlite`, one table ``patients`` each,
plus `DIR/split.json` saying which dataset, seed and skew made it. Each row keeps its position in
the bundled table as ``row_id`` (the table's INTEGER PRIMARY KEY), so the pooled table a reference
library fits is exactly the union of the sites' rows.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from clinfed.data.clinical import OUTCOME, check_dataset, load_dataset
from clinfed.errors import SiteDataError
from clinfed.textio import one_line, write_private

#: The table every site database holds, unless the site's policy names another.
TABLE = "patients"
#: The bundled table's row position, kept as each site table's primary key (not a variable).
ROW_ID = "row_id"
#: Fewer sites cannot be summed safely: with two, each site subtracts its own part and reads the other's.
MIN_SITES = 3
#: No site gets fewer patients than this from a split.
MIN_PATIENTS = 10
#: Dirichlet redraws before a skewed split gives up on giving every site MIN_PATIENTS.
_SKEW_TRIES = 200
MANIFEST = "split.json"


def site_names(sites: int) -> list[str]:
    """The simulator's site names: site-1 .. site-N."""
    return [f"site-{i}" for i in range(1, sites + 1)]


# ---------------------------------------------------------------------------------------------
# splitting


def split_indices(
    strata: np.ndarray, sites: int, seed: int = 0, skew: float | None = None, name: str = "the dataset"
) -> list[np.ndarray]:
    """Row indices (sorted) for each site, deterministic in `seed`.

    Without `skew`: stratified on `strata` (the outcome) and as even as possible, sizes differing by at
    most one, so every site sees events and non-events in the pooled proportion. With `skew` = α:
    each outcome class is shared among the sites in Dirichlet(α, …, α) proportions, as hospitals
    differ in size and case mix (small α, strong skew), redrawn until every site holds at least
    MIN_PATIENTS rows.
    """
    strata = np.asarray(strata)
    n = len(strata)
    if sites < MIN_SITES:
        raise ValueError(f"needs at least {MIN_SITES} sites (a sum of two lets each site read the other's)")
    if n // sites < MIN_PATIENTS:
        raise ValueError(
            f"{name} has {n} patients: {sites} sites would leave a site with fewer than {MIN_PATIENTS} "
            f"(at most {n // MIN_PATIENTS} sites)"
        )
    rng = np.random.default_rng(seed)
    classes = np.unique(strata)
    if skew is None:
        order = np.concatenate([rng.permutation(np.flatnonzero(strata == c)) for c in classes])
        owner = np.arange(n) % sites  # dealt in turn: sizes and event counts differ by at most one
        return [np.sort(order[owner == k]) for k in range(sites)]
    if not math.isfinite(skew) or skew <= 0:
        raise ValueError(f"skew must be a positive number (a Dirichlet α), got {skew}")
    for _ in range(_SKEW_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(sites)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(strata == c))
            cuts = np.round(np.cumsum(rng.dirichlet([skew] * sites))[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= MIN_PATIENTS:
            return out
    raise ValueError(
        f"a Dirichlet(α={skew:g}) split of {name} into {sites} sites left a site with fewer than "
        f"{MIN_PATIENTS} patients in {_SKEW_TRIES} draws: use a larger --skew or fewer sites"
    )


def _sql_type(values: np.ndarray) -> str:
    if values.dtype.kind in "iub":
        return "INTEGER"
    if values.dtype.kind == "f":
        return "REAL"
    return "TEXT"


def _cell(value: Any) -> Any:
    """A table cell as SQLite takes it: numpy scalars to Python, NaN to NULL."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def quote(identifier: str) -> str:
    """An SQL identifier quoted (double quotes doubled), so no name is ever read as SQL."""
    return '"' + str(identifier).replace('"', '""') + '"'


def write_site_db(path: str | os.PathLike, table, row_ids: Sequence[int], name: str = TABLE) -> Path:
    """Write `table` (a DataFrame) to a new SQLite file at `path`, readable by its owner only.

    The file is created 0600 before SQLite opens it (patients' rows are never world-readable) and
    written under a temporary name, then renamed, so a reader never sees half a database.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, b"")  # SQLite takes an empty file as an empty database and keeps its mode
    columns = list(table.columns)
    decl = ", ".join(
        [f"{quote(ROW_ID)} INTEGER PRIMARY KEY"] + [f"{quote(c)} {_sql_type(table[c].to_numpy())}" for c in columns]
    )
    rows = (
        (int(rid), *(_cell(v) for v in values))
        for rid, values in zip(row_ids, table.itertuples(index=False, name=None), strict=True)
    )
    try:
        conn = sqlite3.connect(tmp)
        try:
            with conn:  # one transaction: committed whole or not at all
                conn.execute(f"CREATE TABLE {quote(name)} ({decl})")
                marks = ", ".join("?" * (len(columns) + 1))
                conn.executemany(f"INSERT INTO {quote(name)} VALUES ({marks})", rows)
        finally:
            conn.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def split_dataset(
    name: str, sites: int, out_dir: str | os.PathLike, seed: int = 0, skew: float | None = None
) -> dict[str, Path]:
    """Split dataset `name` among `sites` sites and write `out_dir/<site>.sqlite` for each; {site: path}.

    Refuses (one-line ValueError, nothing written) an unknown dataset, fewer than MIN_SITES sites, a
    site that would get fewer than MIN_PATIENTS patients, a folder that cannot be written, and a folder
    holding other site databases (an earlier split into more sites would otherwise be read along).
    """
    check_dataset(name)
    if sites < MIN_SITES:
        raise ValueError(f"needs at least {MIN_SITES} sites (a sum of two lets each site read the other's)")
    table = load_dataset(name)
    parts = split_indices(table[OUTCOME[name]].to_numpy(), sites, seed=seed, skew=skew, name=name)
    out = Path(out_dir)
    names = site_names(sites)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in out.glob("*.sqlite") if p.stem not in names)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: {exc.strerror or one_line(exc)}") from None
    if stale:
        raise ValueError(f"{out} already holds other site databases ({', '.join(stale)}): use an empty folder")
    paths: dict[str, Path] = {}
    try:
        for site, idx in zip(names, parts, strict=True):
            paths[site] = write_site_db(out / f"{site}.sqlite", table.iloc[idx], idx)
        manifest = {
            "dataset": name,
            "seed": seed,
            "skew": skew,
            "table": TABLE,
            "outcome": OUTCOME[name],
            "rows": len(table),
            "sites": {
                site: {"rows": len(idx), "events": int(table[OUTCOME[name]].to_numpy()[idx].sum())}
                for site, idx in zip(names, parts, strict=True)
            },
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except (OSError, sqlite3.Error) as exc:
        raise ValueError(f"cannot write {out}: {getattr(exc, 'strerror', None) or one_line(exc)}") from None
    return paths


def find_site_databases(data_dir: str | os.PathLike) -> dict[str, Path]:
    """{site: path} for every `<site>.sqlite` in `data_dir` (what `--data-dir` hands each site)."""
    found = sorted(Path(data_dir).glob("*.sqlite"), key=lambda p: (len(p.stem), p.stem))  # site-2 before site-10
    return {p.stem: p for p in found}


# ---------------------------------------------------------------------------------------------
# reading


def _is_url(source: str | os.PathLike) -> bool:
    return isinstance(source, str) and "://" in source


def _describe(source: str | os.PathLike) -> str:
    """The source as an error may show it: a path, or a URL without its password."""
    if _is_url(source):
        try:
            from sqlalchemy.engine import make_url

            return make_url(source).render_as_string(hide_password=True)
        except Exception:
            return str(source).split("://", 1)[0] + "://…"
    return str(source)


def _site_of(source: str | os.PathLike, site: str | None) -> str | None:
    """The site an error names: given, or a SQLite file's stem (site-2.sqlite -> site-2); a URL names itself."""
    return site or (None if _is_url(source) else Path(source).stem)


def _scrub(text: str, source: str | os.PathLike) -> str:
    """A driver's message with the URL's password taken out, should the driver echo it."""
    if _is_url(source):
        try:
            from sqlalchemy.engine import make_url

            password = make_url(source).password
        except Exception:
            password = None
        if password:
            text = text.replace(str(password), "***")
    return text


def _to_array(values: list[Any]) -> np.ndarray:
    """One column as numpy: int64 when whole and complete, float64 (NaN missing) when numeric, else
    object (text, None missing)."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, bool | int | np.integer) for v in present) and len(present) == len(values) and present:
        return np.asarray(values, dtype=np.int64)
    if all(isinstance(v, bool | int | float | Decimal | np.number) for v in present):
        return np.asarray([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _split_table(table: str) -> tuple[str | None, str]:
    schema, dot, name = table.rpartition(".")
    return (schema or None, name) if dot else (None, table)


def _read_sqlite(path: Path, table: str) -> tuple[list[str], Any]:
    if not path.is_file():
        raise FileNotFoundError(f"no such database {path}")
    conn = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)  # never creates a file
    present = [row[1] for row in conn.execute(f"PRAGMA table_info({quote(table)})")]
    return present, conn


def _fetch(source: str | os.PathLike, table: str, wanted: list[str]) -> tuple[list[str], list[tuple]]:
    """(columns the table has, rows of `wanted` in row_id order where the table has it)."""
    if not _is_url(source):
        present, conn = _read_sqlite(Path(source), table)
        try:
            if not present or not wanted or not set(wanted) <= set(present):
                return present, []
            order = f" ORDER BY {quote(ROW_ID)}" if ROW_ID in present else ""
            cols = ", ".join(quote(c) for c in wanted)
            return present, conn.execute(f"SELECT {cols} FROM {quote(table)}{order}").fetchall()
        finally:
            conn.close()
    import sqlalchemy as sa

    engine = sa.create_engine(source)
    try:
        schema, name = _split_table(table)
        try:
            reflected = sa.Table(name, sa.MetaData(), schema=schema, autoload_with=engine)
        except sa.exc.NoSuchTableError:
            return [], []
        present = [c.name for c in reflected.columns]
        if not wanted or not set(wanted) <= set(present):
            return present, []
        query = sa.select(*(reflected.c[c] for c in wanted))
        if ROW_ID in present:
            query = query.order_by(reflected.c[ROW_ID])
        with engine.connect() as conn:
            return present, [tuple(r) for r in conn.execute(query)]
    finally:
        engine.dispose()


def read_site_table(
    source: str | os.PathLike,
    columns: Sequence[str],
    mapping: Mapping[str, str] | None = None,
    table: str = TABLE,
    site: str | None = None,
) -> dict[str, np.ndarray]:
    """Variables `columns` of one site's patients, {variable: array}, rows aligned across variables.

    `source` is a SQLite file path or an SQLAlchemy URL (``sqlite:///…``, ``postgresql://…``);
    `mapping` {variable: column} renames what the job asks for into the site's own columns (default:
    the same name); `table` may be ``schema.table`` or a view. Read all of one analysis' variables in
    one call: rows are aligned within a call (and ordered by ``row_id`` where the table has it).
    A missing file, table or column is a one-line SiteDataError naming the site, the source and what
    is missing; missing values come back as NaN (numbers) or None (text).
    """
    variables = list(dict.fromkeys(columns))
    if not variables:
        raise SiteDataError(one_line("no variables asked for", _site_of(source, site)))
    mapping = dict(mapping or {})
    wanted = [mapping.get(v, v) for v in variables]
    where = f"{table} in {_describe(source)}"
    who = _site_of(source, site)
    try:
        present, rows = _fetch(source, table, wanted)
    except FileNotFoundError as exc:
        raise SiteDataError(one_line(str(exc), who)) from None
    except Exception as exc:  # a driver's own error (bad URL, no driver, refused connection): one line, no password
        cause = _scrub(f"{type(exc).__name__}: {one_line(exc)}", source)
        raise SiteDataError(one_line(f"cannot read {where}: {cause}", who)) from None
    if not present:
        raise SiteDataError(one_line(f"no table {table} in {_describe(source)}", who))
    missing = [
        f"'{v}'" + (f" (column '{c}')" if c != v else "")
        for v, c in zip(variables, wanted, strict=True)
        if c not in present
    ]
    if missing:
        shown = ", ".join(c for c in present if c != ROW_ID)
        raise SiteDataError(one_line(f"no variable {', '.join(missing)} in {where} (has: {shown})", who))
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in wanted]
    return {v: _to_array(list(col)) for v, col in zip(variables, cols, strict=True)}


def site_columns(source: str | os.PathLike, table: str = TABLE, site: str | None = None) -> list[str]:
    """The variables a site's table offers (its columns less ``row_id``)."""
    who = _site_of(source, site)
    try:
        present, _ = _fetch(source, table, [])
    except FileNotFoundError as exc:
        raise SiteDataError(one_line(str(exc), who)) from None
    except Exception as exc:
        cause = _scrub(f"{type(exc).__name__}: {one_line(exc)}", source)
        raise SiteDataError(one_line(f"cannot read {table} in {_describe(source)}: {cause}", who)) from None
    if not present:
        raise SiteDataError(one_line(f"no table {table} in {_describe(source)}", who))
    return [c for c in present if c != ROW_ID]


def is_missing(values: np.ndarray) -> np.ndarray:
    """True where a value is missing: NaN in a numeric column, None (or NaN) in a text column."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind in "iub":
        return np.zeros(len(values), dtype=bool)
    return np.fromiter((v is None or (isinstance(v, float) and math.isnan(v)) for v in values), bool, len(values))


def complete_cases(table: Mapping[str, np.ndarray], columns: Sequence[str] | None = None) -> np.ndarray:
    """Boolean mask of the rows with no missing value in `columns` (default: all of `table`).

    An analysis uses complete cases on its own variables and reports ``int(mask.sum())`` as its n.
    """
    names = list(table) if columns is None else list(columns)
    unknown = [c for c in names if c not in table]
    if unknown:
        raise ValueError(f"no variable {', '.join(unknown)} in the table (has: {', '.join(table)})")
    n = len(next(iter(table.values()))) if table else 0
    mask = np.ones(n, dtype=bool)
    for c in names:
        mask &= ~is_missing(table[c])
    return mask
