"""Where a site's variables come from: its policy's database (any SQLAlchemy URL, a table or view, a
column mapping), else its data_dir split, else a refusal.

What must hold: a hospital whose columns are named otherwise, behind a view, hands a job exactly the
arrays the split reader gives; the URL may come from the environment; every failure is one line
naming the site and the cause and never shows a password; the database wins over data_dir; a
malformed policy section is refused when the policy is loaded; reading never creates a database.
"""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from clinfed.data.sitedb import TABLE, read_site_table, split_dataset
from clinfed.data.source import site_table
from clinfed.errors import SiteDataError, SiteRefusal
from clinfed.fl.participant import SiteDatabase, SitePolicy, write_site_policy

SITE = "site-2"
VARIABLES = ["time", "event", "age", "creatinine", "chapter", "sex"]
#: The hospital's own names for what jobs call time, event, age, creatinine, chapter (sex keeps its name).
MAPPING = {"time": "FU days", "event": "died", "age": "age_years", "creatinine": "creat", "chapter": "icd_chapter"}
VIEW = "v_clinfed_cohort"
SECRET = "s3cret"


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A flchain split (missing numbers and missing text) whose site-2 also holds the hospital's own
    table (other column names, other column order) and a view over it, as a site would define."""
    out = tmp_path_factory.mktemp("split")
    path = split_dataset("flchain", 3, out)[SITE]
    with sqlite3.connect(path) as conn:
        conn.execute(
            f"CREATE TABLE ehr AS SELECT row_id AS pid, chapter AS icd_chapter, sex, creatinine AS creat, "
            f'age AS age_years, event AS died, time AS "FU days", kappa FROM {TABLE}'
        )
        conn.execute(
            f'CREATE VIEW {VIEW} AS SELECT pid, "FU days", died, age_years, creat, icd_chapter, sex '
            "FROM ehr ORDER BY pid"
        )
    conn.close()
    return out, path


def _policy(tmp_path, **settings) -> SitePolicy:
    root = tmp_path / SITE
    write_site_policy(root, **settings)
    return SitePolicy.load(root)


def _assert_same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for name, values in want.items():
        assert got[name].dtype == values.dtype, name
        if values.dtype == object:
            assert got[name].tolist() == values.tolist(), name
        else:
            np.testing.assert_array_equal(got[name], values, err_msg=name)  # NaN where NaN


def _one_line_error(exc_type, fn, *needles) -> str:
    with pytest.raises(exc_type) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and SECRET not in message, message
    assert message.startswith(f"{SITE}: "), message
    assert all(n in message for n in needles), message
    return message


def test_a_mapped_view_through_a_url_gives_the_split_readers_arrays(split, tmp_path):
    _, path = split
    want = read_site_table(path, VARIABLES, site=SITE)
    assert np.isnan(want["creatinine"]).any() and any(v is None for v in want["chapter"])  # missing kept
    policy = _policy(tmp_path, database={"url": f"sqlite:///{path}", "table": VIEW, "columns": MAPPING})
    assert policy.database == SiteDatabase(url=f"sqlite:///{path}", table=VIEW, columns=MAPPING)
    _assert_same(site_table(policy, SITE, VARIABLES), want)
    # the mapped table itself, unordered by row_id but the same rows in the same order here
    on_table = _policy(tmp_path, database={"url": f"sqlite:///{path}", "table": "ehr", "columns": MAPPING})
    _assert_same(site_table(on_table, SITE, VARIABLES), want)


def test_the_url_can_come_from_the_environment(split, tmp_path, monkeypatch):
    _, path = split
    monkeypatch.setenv("CLINFED_DB_URL", f"sqlite:///{path}")
    policy = _policy(tmp_path, database={"url_env": "CLINFED_DB_URL", "table": VIEW, "columns": MAPPING})
    _assert_same(site_table(policy, SITE, ["time", "sex"]), read_site_table(path, ["time", "sex"]))
    assert "CLINFED_DB_URL" in json.dumps(json.loads((tmp_path / SITE / "local" / "resources.json").read_text()))

    monkeypatch.setenv("CLINFED_DB_URL", f"postgresql://clin:{SECRET}@db.example:notaport/omop")
    _one_line_error(
        SiteDataError, lambda: site_table(policy, SITE, ["time"]), "CLINFED_DB_URL", "not an SQLAlchemy URL"
    )
    monkeypatch.setenv("CLINFED_DB_URL", f"postgresql://clin:{SECRET}@127.0.0.1:1/omop")
    _one_line_error(SiteDataError, lambda: site_table(policy, SITE, ["time"]), "cannot read", "clin:***@127.0.0.1")
    monkeypatch.delenv("CLINFED_DB_URL")
    _one_line_error(SiteDataError, lambda: site_table(policy, SITE, ["time"]), "CLINFED_DB_URL", "not set")


def test_the_database_wins_over_data_dir(split, tmp_path):
    out, path = split
    with sqlite3.connect(path) as conn:
        conn.execute(f'CREATE VIEW IF NOT EXISTS doubled AS SELECT row_id, 2 * time AS "time" FROM {TABLE}')
    conn.close()
    split_reader = _policy(tmp_path, data_dir=str(out))
    both = _policy(tmp_path, data_dir=str(out), database={"url": f"sqlite:///{path}", "table": "doubled"})
    assert both.data_dir == str(out) and both.database is not None
    np.testing.assert_array_equal(
        site_table(both, SITE, ["time"])["time"], 2 * site_table(split_reader, SITE, ["time"])["time"]
    )
    _assert_same(site_table(split_reader, SITE, VARIABLES), read_site_table(path, VARIABLES))


def test_no_policy_or_no_source_is_a_one_line_refusal(tmp_path):
    _one_line_error(SiteRefusal, lambda: site_table(None, SITE, ["time"]), "no local policy")
    _one_line_error(SiteRefusal, lambda: site_table(SitePolicy(), SITE, ["time"]), "no database or data_dir")
    _one_line_error(
        SiteDataError, lambda: site_table(SitePolicy(data_dir=str(tmp_path)), SITE, ["time"]), f"no {SITE}.sqlite"
    )


@pytest.mark.parametrize(
    ("database", "variables", "needles"),
    [
        ({"table": "visits"}, ["time"], ["no table visits in sqlite:///{dir}/site-2.sqlite"]),
        ({"table": VIEW, "columns": MAPPING}, ["time", "bmi"], ["no variable 'bmi'", VIEW, "has: pid"]),
        ({"table": VIEW, "columns": {**MAPPING, "age": "age_at_index"}}, ["age"], ["'age' (column 'age_at_index')"]),
        ({"url": "sqlite:///{dir}/site-9.sqlite"}, ["time"], ["no such database", "site-9.sqlite"]),
        ({"url": "sqlite:///{dir}/garbage.sqlite"}, ["time"], ["cannot read", "not a database"]),
        ({"url": f"postgresql://clin:{SECRET}@127.0.0.1:1/omop"}, ["time"], ["cannot read", "clin:***@127.0.0.1"]),
        ({"url": f"postgresql://clin:{SECRET}%2F@127.0.0.1:1/omop"}, ["time"], ["cannot read"]),
        ({"url": f"postgresql://clin:{SECRET}@db.example:notaport/omop"}, ["time"], ["url is not an SQLAlchemy URL"]),
        ({"url": f"postgres:clin:{SECRET}@db.example"}, ["time"], ["url is not an SQLAlchemy URL"]),
        ({"url": f"nosuchdb://clin:{SECRET}@db.example/omop"}, ["time"], ["cannot read", "nosuchdb"]),
        ({"url": "postgresql://clin@127.0.0.1:1/omop", "password_env": "CLINFED_NO_SUCH_VAR"}, ["time"], ["not set"]),
    ],
)
def test_read_failures_are_one_line_naming_site_and_cause_without_the_password(
    split, tmp_path, database, variables, needles
):
    out, path = split
    (out / "garbage.sqlite").write_bytes(b"not sqlite at all " * 100)
    database = {"url": f"sqlite:///{path}", **database}
    database["url"] = database["url"].format(dir=out)
    policy = _policy(tmp_path, data_dir=str(out), database=database)
    message = _one_line_error(
        SiteDataError, lambda: site_table(policy, SITE, variables), *(n.format(dir=out) for n in needles)
    )
    assert "mode=ro" not in message  # the URL as the site wrote it, not the read-only URI it is opened as
    assert not (out / "site-9.sqlite").exists()  # reading never creates a database


def test_a_password_from_the_environment_never_shows(tmp_path, monkeypatch):
    monkeypatch.setenv("CLINFED_DB_PASSWORD", SECRET)
    policy = _policy(
        tmp_path, database={"url": "postgresql://clin@127.0.0.1:1/omop", "password_env": "CLINFED_DB_PASSWORD"}
    )
    _one_line_error(SiteDataError, lambda: site_table(policy, SITE, ["time"]), "cannot read", "clin:***@127.0.0.1")


def test_reading_a_sqlite_url_never_writes(split, tmp_path):
    _, path = split
    before = path.read_bytes()
    policy = _policy(tmp_path, database={"url": f"sqlite:///{path}", "table": VIEW, "columns": MAPPING})
    site_table(policy, SITE, VARIABLES)
    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        (f"postgresql://clin:{SECRET}@db/omop", "must be an object"),
        ({"table": "person"}, "exactly one of url"),
        ({"url": f"postgresql://clin:{SECRET}@db/omop", "url_env": "CLINFED_DB_URL"}, "exactly one of url"),
        ({"url": ""}, "url must be a non-empty string"),
        ({"url": ["postgresql://"]}, "url must be a non-empty string"),
        ({"url_env": "CLINFED DB URL"}, "url_env must name an environment variable"),
        ({"url_env": "X", "password_env": 3}, "password_env must name an environment variable"),
        ({"url_env": "X", "table": ""}, "table must be a non-empty"),
        ({"url_env": "X", "columns": {"time": 3}}, "columns must map"),
        ({"url_env": "X", "columns": ["time"]}, "columns must map"),
        ({"url_env": "X", "colums": {"time": "t"}}, "unknown key(s) colums"),
    ],
)
def test_a_malformed_database_section_is_refused_at_load(tmp_path, section, needle):
    root = tmp_path / SITE
    write_site_policy(root, database=section)
    _one_line_error(SiteRefusal, lambda: SitePolicy.load(root), "local policy database", needle)


def test_the_policy_never_shows_a_password_it_holds(tmp_path):
    policy = _policy(tmp_path, database={"url": f"postgresql://clin:{SECRET}@db/omop", "table": "cdm.person"})
    assert SECRET not in repr(policy) and "cdm.person" in repr(policy)
    assert SitePolicy.load(tmp_path / "nowhere").database is None
