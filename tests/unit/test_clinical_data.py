"""Clinical datasets, their per-site split and reading a site's variables back.

What must hold for the analytics to be checked against pooled reference fits: every bundled dataset
loads with the documented rows and uniform outcome columns, the sites' databases together are exactly
the source table (no patient lost, duplicated or altered, missing values still missing), the split is
a function of its seed, and every bad input is one line naming what is wrong, with nothing written.
"""

from __future__ import annotations

import math
import numbers
import os
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from clinfed.cli import main
from clinfed.data.clinical import DATASETS, OUTCOME, load_dataset
from clinfed.data.sitedb import (
    MIN_PATIENTS,
    ROW_ID,
    TABLE,
    complete_cases,
    find_site_databases,
    read_site_table,
    site_columns,
    split_dataset,
    split_indices,
)
from clinfed.errors import SiteDataError

ROWS = {"whas500": 500, "gbsg2": 686, "aids": 1151, "flchain": 7874, "veterans": 137, "breast_cancer": 569}
EVENTS = {"whas500": 215, "gbsg2": 299, "aids": 96, "flchain": 2169, "veterans": 128, "breast_cancer": 212}
SITES = {"whas500": 3, "gbsg2": 4, "aids": 5, "flchain": 5, "veterans": 3, "breast_cancer": 4}


@pytest.fixture(scope="module")
def tables():
    return {name: load_dataset(name) for name in DATASETS}


def _same(a, b) -> bool:
    """Cell equality where missing equals missing (NaN or None), text equals text, numbers equal numbers."""
    a_missing = a is None or (isinstance(a, float) and math.isnan(a))
    b_missing = b is None or (isinstance(b, float) and math.isnan(b))
    if a_missing or b_missing:
        return a_missing and b_missing
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    return isinstance(a, numbers.Number) and isinstance(b, numbers.Number) and a == b


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_loads_with_uniform_outcome_and_documented_rows(tables, name):
    table = tables[name]
    assert len(table) == ROWS[name]
    outcome = OUTCOME[name]
    assert table[outcome].dtype == np.int64 and set(np.unique(table[outcome])) == {0, 1}
    assert int(table[outcome].sum()) == EVENTS[name]
    if name != "breast_cancer":
        assert list(table.columns[:2]) == ["time", "event"]
        assert table["time"].dtype == np.float64 and (table["time"] >= 0).all()  # flchain has 3 zeros
    for col in table.columns:
        assert "." not in col and " " not in col, col
        if table[col].dtype == object:  # categoricals are text, missing is None
            assert all(v is None or isinstance(v, str) for v in table[col]), col


def test_sources_are_read_faithfully():
    """Against scikit-survival's own arrays, not our loader: times, events and renamed covariates."""
    from sksurv.datasets import load_flchain, load_gbsg2

    x, y = load_gbsg2()
    gbsg2 = load_dataset("gbsg2")
    np.testing.assert_array_equal(gbsg2["time"], y["time"])
    np.testing.assert_array_equal(gbsg2["event"], y["cens"].astype(int))
    assert list(gbsg2["tgrade"]) == [str(v) for v in x["tgrade"]]

    x, y = load_flchain()
    flchain = load_dataset("flchain")
    np.testing.assert_array_equal(flchain["time"], y["futime"])
    assert list(flchain["flc_grp"]) == [str(v) for v in x["flc.grp"]]
    assert int(flchain["creatinine"].isna().sum()) == 1350  # missing stays missing, as NaN
    assert sum(v is None for v in flchain["chapter"]) == 5705  # and as None in text


def test_unknown_dataset_is_one_line_listing_the_known_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("mimic")
    assert "\n" not in str(err.value) and "mimic" in str(err.value)
    assert all(name in str(err.value) for name in DATASETS)


@pytest.mark.parametrize("name", DATASETS)
def test_sites_together_are_exactly_the_source_table(tables, tmp_path, name):
    """Read back through read_site_table, the sites' rows re-concatenate to the full table, cell for cell."""
    source = tables[name]
    paths = split_dataset(name, SITES[name], tmp_path, seed=7)
    assert list(paths) == [f"site-{k}" for k in range(1, SITES[name] + 1)]
    assert find_site_databases(tmp_path) == paths
    columns = list(source.columns)
    parts = [read_site_table(p, [ROW_ID, *columns]) for p in paths.values()]
    assert all(len(p[ROW_ID]) >= MIN_PATIENTS for p in parts)
    row_ids = np.concatenate([p[ROW_ID] for p in parts])
    assert sorted(row_ids.tolist()) == list(range(len(source)))  # every patient once, none twice
    order = np.argsort(row_ids)
    for col in columns:
        pooled = np.concatenate([p[col] for p in parts])[order]
        assert pooled.dtype.kind == source[col].to_numpy().dtype.kind or pooled.dtype == object, col
        mismatched = [i for i, (a, b) in enumerate(zip(pooled, source[col], strict=True)) if not _same(a, b)]
        assert not mismatched, f"{name}.{col}: rows {mismatched[:5]} differ"


def test_split_is_a_function_of_its_seed(tmp_path):
    def rows(seed, out, skew=None):
        paths = split_dataset("gbsg2", 3, tmp_path / out, seed=seed, skew=skew)
        return [read_site_table(p, [ROW_ID])[ROW_ID].tolist() for p in paths.values()]

    assert rows(1, "a") == rows(1, "b")
    assert rows(1, "a") != rows(2, "c")
    assert rows(1, "d", skew=0.5) == rows(1, "e", skew=0.5)


def test_even_split_is_balanced_in_size_and_events(tables):
    event = tables["flchain"]["event"].to_numpy()
    parts = split_indices(event, 5, seed=0)
    sizes = [len(p) for p in parts]
    events = [int(event[p].sum()) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and max(events) - min(events) <= 1


def test_skew_gives_sites_different_case_mix(tables):
    malignant = tables["breast_cancer"]["malignant"].to_numpy()
    parts = split_indices(malignant, 4, seed=3, skew=0.5)
    fractions = [malignant[p].mean() for p in parts]
    assert max(fractions) - min(fractions) > 0.3  # an even split keeps them within a few percent
    assert min(len(p) for p in parts) >= MIN_PATIENTS


@pytest.mark.parametrize(
    ("sites", "skew", "needle"),
    [
        (2, None, "needs at least 3 sites (a sum of two lets each site read the other's)"),
        (14, None, "fewer than 10"),
        (13, 0.05, "fewer than 10 patients"),
    ],
)
def test_split_refusals_are_one_line_and_write_nothing(tmp_path, sites, skew, needle):
    out = tmp_path / "out"
    with pytest.raises(ValueError) as err:
        split_dataset("veterans", sites, out, skew=skew)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())


def test_split_refuses_a_folder_with_other_sites_databases(tmp_path):
    """A 3-site split over an earlier 5-site one would leave site-4/5 to be read along with it."""
    split_dataset("veterans", 5, tmp_path)
    with pytest.raises(ValueError, match=r"site-4\.sqlite, site-5\.sqlite"):
        split_dataset("veterans", 3, tmp_path)
    split_dataset("veterans", 5, tmp_path, seed=1)  # the same sites again is a re-split, allowed


def test_site_databases_are_private_to_their_owner(tmp_path):
    for path in split_dataset("veterans", 3, tmp_path).values():
        assert os.stat(path).st_mode & 0o077 == 0, path


def test_read_site_table_by_variable_names_with_a_mapping_and_a_url(tmp_path):
    path = split_dataset("flchain", 3, tmp_path)["site-2"]
    with sqlite3.connect(path) as conn:  # a site whose own columns are named otherwise
        conn.execute(
            f'CREATE TABLE cohort AS SELECT futime_d AS "FU days", died FROM '
            f"(SELECT time AS futime_d, event AS died FROM {TABLE})"
        )
    conn.close()
    direct = read_site_table(path, ["time", "event", "creatinine"])
    mapped = read_site_table(
        f"sqlite:///{path}", ["time", "event"], mapping={"time": "FU days", "event": "died"}, table="cohort"
    )
    np.testing.assert_array_equal(mapped["time"], direct["time"])
    np.testing.assert_array_equal(mapped["event"], direct["event"])
    assert direct["event"].dtype == np.int64 and direct["time"].dtype == np.float64
    assert site_columns(path)[:2] == ["time", "event"] and ROW_ID not in site_columns(path)

    mask = complete_cases(direct, ["time", "creatinine"])
    assert mask.sum() == np.isfinite(direct["creatinine"]).sum() < len(mask)
    text = read_site_table(path, ["chapter"])["chapter"]
    assert complete_cases({"chapter": text}).sum() == sum(v is not None for v in text)


@pytest.mark.parametrize(
    ("source", "columns", "kwargs", "needles"),
    [
        ("{dir}/site-1.sqlite", ["age", "bogus"], {}, ["site-1", "'bogus'", "site-1.sqlite", "has: time"]),
        ("{dir}/site-1.sqlite", ["age", "cr"], {"mapping": {"cr": "creat"}}, ["site-1", "'cr' (column 'creat')"]),
        ("{dir}/site-1.sqlite", ["age"], {"table": "visits"}, ["site-1", "no table visits"]),
        ("{dir}/site-9.sqlite", ["age"], {}, ["site-9", "no such database"]),
        ("postgresql://clin:s3cret@127.0.0.1:1/omop", ["age"], {"site": "site-3"}, ["site-3", "cannot read"]),
    ],
)
def test_read_errors_are_one_line_naming_site_source_and_cause(tmp_path, source, columns, kwargs, needles):
    split_dataset("veterans", 3, tmp_path)
    source = source.format(dir=tmp_path)
    with pytest.raises(SiteDataError) as err:
        read_site_table(source, columns, **kwargs)
    message = str(err.value)
    assert "\n" not in message and "s3cret" not in message
    assert all(n in message for n in needles), message
    assert not (tmp_path / "site-9.sqlite").exists()  # reading never creates an empty database


def test_cli_split_prints_one_line_per_site_and_exits_0(tmp_path, capsys):
    assert main(["data", "split", "--dataset", "gbsg2", "--sites", "4", "--out", str(tmp_path), "--seed", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    site_lines = [line for line in lines if line.startswith("site-")]
    assert len(site_lines) == 4 and all("rows" in line and "events" in line for line in site_lines)
    assert sum(int(line.split()[2]) for line in site_lines) == 686
    assert sum(int(line.split()[4]) for line in site_lines) == 299
    assert sorted(p.name for p in Path(tmp_path).glob("*.sqlite")) == [f"site-{k}.sqlite" for k in range(1, 5)]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--dataset", "mimic", "--sites", "3"], "unknown dataset 'mimic'"),
        (["--dataset", "gbsg2", "--sites", "2"], "needs at least 3 sites"),
        (["--dataset", "veterans", "--sites", "20"], "fewer than 10"),
        (["--dataset", "gbsg2", "--sites", "3", "--skew", "-1"], "--skew"),
        (["--dataset", "gbsg2", "--sites", "3", "--out", "{file}/sub"], "cannot write"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys, argv, needle):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = [a.format(file=blocker) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert main(["data", "split", *argv]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err and captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert not list(tmp_path.rglob("*.sqlite"))
