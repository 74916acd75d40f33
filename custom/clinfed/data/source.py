"""A site's patients by variable name, from wherever its own policy says they are.

A job names variables (``time``, ``event``, ``age``), never a table, a file or SQL; the hospital's
`local/resources.json` → "clinfed" says where they live. In order:

1. ``database``: an SQLAlchemy URL (PostgreSQL, an OMOP CDM view the site defines, SQLite, ...), a
   table or view, and a {variable: column} mapping. The URL may come from an environment variable
   (``url_env``), and its password from another (``password_env``), so no password sits in a file.
   Only the mapped columns of that one table or view are selected, through SQLAlchemy's reflected
   table (quoted identifiers, no SQL built from strings). A SQLite file is opened read-only and never
   created.
2. ``data_dir``: the embedded default, the folder `clinfed data split` writes (`<site>.sqlite`).
3. Neither: the site refuses (SiteRefusal).

Every failure is one line naming the site and the cause (no policy, unset variable, bad URL,
unreachable database, missing table, unknown column). A URL is only ever shown without its password,
and a driver's message is scrubbed of it too, should the driver echo it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote as url_quote

import numpy as np

from clinfed.data.sitedb import find_site_databases, read_site_table
from clinfed.errors import SiteDataError, SiteRefusal
from clinfed.textio import one_line

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from clinfed.fl.participant import SiteDatabase, SitePolicy

_POLICY = "local/resources.json"


def site_table(
    policy: SitePolicy, site: str, variables: list[str], cohort: dict | None = None
) -> dict[str, np.ndarray]:
    """The site's `variables`, {variable: array}, rows aligned across variables.

    With `cohort` (an OMOP cohort definition the job carries) the same sources hold an OMOP CDM and
    the variables are the cohort's, built at the site by `clinfed.data.omop.cohort_table`.

    Arrays are what `clinfed.data.sitedb.read_site_table` returns: int64 for a whole, complete numeric
    column, float64 with NaN for missing numbers, object arrays of text with None for missing.
    Raises SiteRefusal without a policy saying where the data is, SiteDataError for data that cannot
    be read; both one line, naming the site.
    """
    if policy is None:
        raise SiteRefusal(f"{site}: no local policy ({_POLICY}): this job reads the site's database")
    if cohort is not None:
        return _omop_cohort(policy, site, variables, cohort)
    if policy.database is not None:
        return read_database(policy.database, site, variables)
    if policy.data_dir:
        dbs = find_site_databases(policy.data_dir)
        if site not in dbs:
            where = policy.data_dir if Path(policy.data_dir).is_dir() else f"{policy.data_dir} (no such folder)"
            raise SiteDataError(f"{site}: no {site}.sqlite in {where}")
        return read_site_table(dbs[site], list(variables), site=site)
    raise SiteRefusal(
        f"{site}: no database or data_dir in {_POLICY}: this job reads the site's database (see docs/site-policy.md)"
    )


def _omop_cohort(policy: SitePolicy, site: str, variables: list[str], cohort: dict) -> dict[str, np.ndarray]:
    """The cohort's `variables` from the site's CDM: its policy's database URL, else `<data_dir>/<site>.sqlite`.

    A cohort smaller than the site's cell floor (policy ``min_cell``, default 5) is refused."""
    from clinfed.data.omop import cohort_table

    floor = int(getattr(policy, "min_cell", None) or 5)
    if policy.database is not None:
        url, secrets, _ = _resolve_url(policy.database, site)
        try:
            return cohort_table(url.render_as_string(hide_password=False), cohort, variables, site, floor)
        except SiteDataError as exc:
            raise SiteDataError(_mask(str(exc), secrets)) from None
    if policy.data_dir:
        dbs = find_site_databases(policy.data_dir)
        if site not in dbs:
            raise SiteDataError(f"{site}: no {site}.sqlite (an OMOP CDM) in {policy.data_dir}")
        return cohort_table(dbs[site], cohort, variables, site, floor)
    raise SiteRefusal(f"{site}: no database or data_dir in {_POLICY}: this job reads the site's OMOP CDM")


def read_database(database: SiteDatabase, site: str, variables: list[str]) -> dict[str, np.ndarray]:
    """`variables` from the table or view of the policy's ``database`` section (see `site_table`)."""
    url, secrets, shown = _resolve_url(database, site)
    try:
        return read_site_table(
            url.render_as_string(hide_password=False),
            list(variables),
            mapping=database.columns,
            table=database.table,
            site=site,
        )
    except SiteDataError as exc:  # read_site_table masks the password already; make sure of every form of it
        text = str(exc).replace(url.render_as_string(hide_password=True), shown)  # the URL as the site wrote it
        raise SiteDataError(_mask(text, secrets)) from None


def _env(name: str, key: str, site: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SiteDataError(f"{site}: environment variable {name} (local policy database.{key}) is not set")
    return value


def _resolve_url(database: SiteDatabase, site: str) -> tuple[URL, list[str], str]:
    """(the parsed URL, with password, ready to connect; every secret string an error must not show;
    the URL as the site gave it, password masked, for errors).

    A SQLite file becomes a read-only ``file:`` URI, so reading never creates or changes a database.
    """
    from sqlalchemy.engine import make_url

    raw = database.url if database.url is not None else _env(str(database.url_env), "url_env", site)
    origin = (
        "local policy database url"
        if database.url is not None
        else f"environment variable {database.url_env} (local policy database.url_env)"
    )
    try:
        url = make_url(raw.strip())
    except Exception:  # the parser's message may quote the URL: name only where it came from
        raise SiteDataError(f"{site}: {origin} is not an SQLAlchemy URL") from None
    secrets = [raw, str(url.password)] if url.password else []
    if database.password_env:
        password = _env(database.password_env, "password_env", site)
        secrets.append(password)
        url = url.set(password=password)
    secrets += [url_quote(s, safe="") for s in secrets]  # as they appear inside a URL
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite":
        url = _sqlite_read_only(url, site, secrets, origin)
    return url, secrets, shown


def _sqlite_read_only(url: URL, site: str, secrets: list[str], origin: str) -> URL:
    """A ``sqlite:///path`` URL as a read-only URI of an existing file (left alone if already a URI)."""
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:") or "uri" in url.query:
        return url
    path = Path(db).expanduser()
    if not path.is_file():
        raise SiteDataError(_mask(f"{site}: no such database {path} ({origin})", secrets))
    return url.set(database=path.resolve().as_uri(), query={**url.query, "mode": "ro", "uri": "true"})


def _mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (the raw URL, its password in any spelling) replaced by ***."""
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):  # the whole URL before its parts
        text = text.replace(secret, "***")
    return one_line(text)
