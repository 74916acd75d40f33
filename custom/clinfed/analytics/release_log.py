"""A site's release log: which exact cohort statistics it has let out, so no later job undoes their suppression.

Small-cell suppression protects one release. Two releases over slightly different row sets undo it
by subtraction: ``all`` then ``intersect`` cohorts, three sites then four, or ten bins then twenty,
differ by exactly the small cells the first release withheld (issue 12, item 7). Each site therefore
keeps `local/release_log.json` of every exact (not output-DP) `cohort_stats` release its rows are in,
and refuses its part in a release the log does not admit.

The rule (sound and deliberately strict):

    A site takes part in exact releases of **one cohort definition** only: the cohort (``all`` or
    ``intersect``), the set of contributing sites, the group partition (group column and each group's
    value) and the digest of the site's own rows. Under that definition, every feature it released
    before must be released again on the **same bin grid** (public bounds and bins) with **the same
    cells**: each group's count and each histogram bin released (with the same value) or withheld
    exactly as before. Features not released before may be added.

Why no exceptions: every released count is a linear function of the rows, and any two definitions'
counts differ by the rows of their difference, so one release per definition is the only rule that
needs no auditing of the whole system of releases. The tempting "allow a second definition when every
difference is 0 or ≥ min_cell" is leaky: with site row counts A = 3, B = C = 20, the releases over
{A, B}, {B, C} and {A, C} differ pairwise by 17, 0 and 17, yet (|AB| + |AC| − |BC|) / 2 = 3 = A.
Under one definition an identical re-run releases identical values (the pooled counts are exact
integers and suppression is deterministic); a change of ``min_cell`` changes which cells are hidden,
and two hiding patterns together can expose a cell hidden in both, hence "the same cells". Counts are
compared too, so a pooled count that changed under the same definition (another site's rows changed)
is refused as well. The group partition is part of the definition because ``all`` is shared by every
partition: ``all`` released under one and withheld (to protect a small residual) under another would
give the residual back.

What counts as released: a site records the release it *agrees to* before it sends its pass-2 sum (a
release that then fails stays recorded, which only makes later checks stricter). Output-DP releases
are not logged: their noise covers differencing, and the privacy ledger charges them. A site whose
data legitimately changed can start a new log only by its operator moving the file aside.

The file is read, checked and appended under an exclusive OS file lock (`fcntl.flock` on a lock file
beside it), as the privacy ledger is, since FLARE runs concurrent jobs in separate processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from clinfed.analytics.stats import StatsSpec
from clinfed.errors import SiteRefusal
from clinfed.textio import write_private

LOG_FILE = "release_log.json"
LOCK_FILE = ".release_log.lock"


class ReleaseRefused(SiteRefusal):
    """The site's release log does not admit this release: together with an earlier one it would
    make a withheld cell derivable."""


@dataclass(frozen=True)
class CohortDefinition:
    """Which rows a release describes, as far as this site can tell (see the module's rule)."""

    cohort: str
    sites: tuple[str, ...]
    group_column: str
    groups: tuple[tuple[str, str], ...]  # (group name, value of the group column), spec order
    data: str  # digest of this site's own rows and labels

    @classmethod
    def of(
        cls, cohort: str, sites: Sequence[str], group_column: str, group_values: Mapping, data: str
    ) -> CohortDefinition:
        return cls(
            cohort=str(cohort),
            sites=tuple(sorted(str(s) for s in sites)),
            group_column=str(group_column),
            groups=tuple((str(g), str(v)) for g, v in group_values.items()),
            data=str(data),
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sites"], d["groups"] = list(self.sites), [list(g) for g in self.groups]
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> CohortDefinition:
        return cls(
            cohort=d["cohort"],
            sites=tuple(d["sites"]),
            group_column=d["group_column"],
            groups=tuple((str(g), str(v)) for g, v in d["groups"]),
            data=d["data"],
        )

    def differences(self, other: CohortDefinition) -> list[str]:
        """What differs from ``other``, in words that name no patient value."""
        out = []
        if self.cohort != other.cohort:
            out.append(f"cohort '{other.cohort}' then '{self.cohort}'")
        if self.sites != other.sites:
            out.append(f"sites {','.join(other.sites)} then {','.join(self.sites)}")
        if (self.group_column, self.groups) != (other.group_column, other.groups):
            out.append(f"groups by '{other.group_column}' then by '{self.group_column}'")
        if self.data != other.data:
            out.append("this site's rows changed")
        return out


def data_digest(x: np.ndarray, labels: Sequence) -> str:
    """Digest of the rows a site summarises (values and group labels); it never leaves the site."""
    h = hashlib.sha256()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float64))
    h.update(str(arr.shape).encode())
    h.update(arr.tobytes())
    h.update("\x1f".join(str(v) for v in labels).encode())
    return h.hexdigest()[:32]


def cells_of(spec: StatsSpec, statistics: Mapping) -> dict[str, dict]:
    """Per feature: its bin grid and, per declared group, the released count and histogram counts
    (None where withheld), read from a release's ``statistics`` (group → feature → entry)."""
    out: dict[str, dict] = {}
    for j, f in enumerate(spec.features):
        cells: dict[str, dict] = {}
        for g in spec.groups:
            entry = (statistics.get(g) or {}).get(f)
            if entry is None:
                cells[g] = {"count": None, "histogram": [None] * spec.bins}
                continue
            hist = entry.get("histogram")
            counts = hist["counts"] if hist else [None] * spec.bins
            cells[g] = {"count": int(entry["count"]), "histogram": [None if c is None else int(c) for c in counts]}
        out[f] = {"grid": [spec.bounds[j][0], spec.bounds[j][1], spec.bins], "cells": cells}
    # Proportions and the incidence rate are cells too (issue 13): each level's count per group, and
    # each group's events (and patients), under the same rule, keyed apart from the features.
    for column, levels in spec.proportions:
        cells = {}
        for g in spec.groups:
            entry = ((statistics.get(g) or {}).get("proportions") or {}).get(column) or {}
            counts = [(entry.get(level) or {}).get("count") for level in levels]
            cells[g] = {"count": None, "histogram": [None if c is None else int(c) for c in counts]}
        out[f"proportions:{column}"] = {"grid": ["levels", *levels], "cells": cells}
    if spec.rate is not None:
        cells = {}
        for g in spec.groups:
            entry = (statistics.get(g) or {}).get("rate") or {}
            events, n = entry.get("events"), entry.get("n")
            cells[g] = {
                "count": None if events is None else int(events),
                "histogram": [None if n is None else int(n)],
            }
        out[f"rate:{spec.rate[0]}:{spec.rate[1]}"] = {"grid": ["rate", spec.rate_bound, spec.rate_per], "cells": cells}
    return out


class ReleaseLog:
    """`<site root>/local/release_log.json`: the exact releases this site took part in (see module doc)."""

    def __init__(self, root: str | Path, site: str, name: str = LOG_FILE):
        """`name`: another method's own log beside cohort_stats' (`toolbox_methods`: one per method)."""
        self.folder = Path(root) / "local"
        self.path, self.site = self.folder / name, site

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            data = json.loads(self.path.read_text())
        except ValueError:
            raise ReleaseRefused(
                f"{self.site}: release log {self.path} is not valid JSON; refusing to release"
            ) from None
        if data.get("site", self.site) != self.site:
            raise ReleaseRefused(f"{self.site}: release log {self.path} belongs to {data.get('site')}")
        return list(data.get("releases", []))

    def check(self, definition: CohortDefinition, cells: Mapping[str, dict], earlier: list[dict]) -> None:
        """Raise ReleaseRefused (one line, naming the earlier job) if the rule does not admit ``cells``."""
        for e in earlier:
            before = CohortDefinition.from_dict(e["definition"])
            label = f"job {e.get('job', '?')} ({e.get('run', '')})".replace(" ()", "")
            if before != definition:
                changed = "; ".join(definition.differences(before))
                raise ReleaseRefused(
                    f"{self.site}: release log: {label} already released exact statistics of another cohort "
                    f"definition ({changed}); the two together would reveal small cells by differencing"
                )
            for f, now in cells.items():
                old = e["features"].get(f)
                if old is None:
                    continue
                if list(old["grid"]) != list(now["grid"]):
                    raise ReleaseRefused(
                        f"{self.site}: release log: feature '{f}' was released on another bin grid by {label}; "
                        "two grids together would reveal the withheld cells between their edges"
                    )
                if old["cells"] != now["cells"]:
                    raise ReleaseRefused(
                        f"{self.site}: release log: feature '{f}' would release other cells than {label} did "
                        "(another min_cell, or pooled counts changed); together they could reveal a withheld cell"
                    )

    def admit(self, definition: CohortDefinition, cells: Mapping[str, dict], job: str, run: str = "") -> None:
        """Check ``cells`` against every earlier release and record them, atomically under the file lock."""
        with self._locked():
            everything = self.entries()
            earlier = [e for e in everything if e.get("kind", "cohort") == "cohort"]  # fits: `admit_fit`
            self.check(definition, cells, earlier)
            same_run = [e for e in earlier if run and e.get("run") == run]
            if any(e["features"] == dict(cells) for e in same_run):
                return  # already recorded by this run (pass 2, then the release site's own release)
            earlier = everything
            earlier.append(
                {
                    "job": job,
                    "run": run,
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "definition": definition.to_dict(),
                    "features": dict(cells),
                }
            )
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            write_private(tmp, json.dumps({"site": self.site, "releases": earlier}, indent=1))
            os.replace(tmp, self.path)

    def admit_fit(
        self,
        method: str,
        definition: FitDefinition,
        grid: Mapping,
        values: Mapping[str, str],
        job: str,
        run: str = "",
    ) -> None:
        """Admit an exact KM, Cox or GLM release before this site's first vector of it leaves.

        The rule (sound and deliberately strict, as for cohort_stats):

            A site takes part in exact fits (KM, Cox, GLM) of **one row set** only: the same
            contributing sites and the same complete-case rows of its own table. Under it, each method
            is released on **one grid** (KM: time bin, bins, group, levels and the minimum cell;
            pooled Cox: time bin, bins and concordance bins), and a variable released before must
            hold the same values. Other covariates, other GLM families, Cox beside KM may be added.

        Why: every fit here is a function of sums over rows; two over different row sets differ by
        the rows in between (four 3-site subsets of 4 sites give each site's n, Σy, Σy²; a covariate
        missing for one patient moves that patient's y between two GLMs), and two KM grids together
        split the bins small-cell merging hid. Output-DP releases are not logged (their noise covers
        differencing and every site's ledger charges them). A site whose data legitimately changed
        starts a new log only by its operator moving the file aside.
        """
        _admit_fit(self, method, definition, grid, values, job, run)


# --- exact fits: Kaplan–Meier, Cox, GLM (issue 23, item 7) ------------------------------------------------
#: the methods whose exact releases `ReleaseLog.admit_fit` governs (cohort_stats: `ReleaseLog.admit`)
FIT_BLOCKS = ("km", "cox", "glm")


def _complete(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        return ~np.isnan(arr)
    if arr.dtype.kind == "O":
        return np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in arr], dtype=bool)
    return np.ones(arr.shape[0], dtype=bool)


def rows_digest(table: Mapping[str, np.ndarray], variables: Sequence[str]) -> str:
    """Digest of *which* of the site's rows a fit uses (its complete cases among all rows read); it
    never leaves the site. Two fits over other complete-case sets differ by the rows in between."""
    n = len(np.asarray(table[variables[0]])) if variables else 0
    mask = np.ones(n, dtype=bool)
    for name in variables:
        mask &= _complete(table[name])
    h = hashlib.sha256(f"{n}|".encode())
    h.update(np.packbits(mask).tobytes())
    return h.hexdigest()[:32]


def value_digests(table: Mapping[str, np.ndarray], variables: Sequence[str]) -> dict[str, str]:
    """Per variable, a digest of its values on every row read (a variable released again must not
    have changed: two fits over changed values differ by the change)."""
    out = {}
    for name in variables:
        arr = np.asarray(table[name])
        text = arr.astype(np.float64).tobytes() if arr.dtype.kind in "biuf" else "\x1f".join(map(str, arr)).encode()
        out[name] = hashlib.sha256(text).hexdigest()[:32]
    return out


@dataclass(frozen=True)
class FitDefinition:
    """The row set an exact fit describes, as far as this site can tell: who contributes, and which of
    this site's rows (see `ReleaseLog.admit_fit`)."""

    sites: tuple[str, ...]
    rows: str

    @classmethod
    def of(cls, sites: Sequence[str], rows: str) -> FitDefinition:
        return cls(sites=tuple(sorted(str(s) for s in sites)), rows=str(rows))

    def to_dict(self) -> dict:
        return {"sites": list(self.sites), "rows": self.rows}

    def differences(self, other: FitDefinition) -> list[str]:
        out = []
        if self.sites != other.sites:
            out.append(f"sites {','.join(other.sites)} then {','.join(self.sites)}")
        if self.rows != other.rows:
            out.append("this site's complete cases changed (another variable with missing values, or new rows)")
        return out


def _admit_fit_check(
    site: str, method: str, definition: FitDefinition, grid: Mapping, values: Mapping[str, str], earlier: list[dict]
) -> None:
    """The fits' rule (see `ReleaseLog.admit_fit`); ReleaseRefused naming the earlier job, else None."""
    for e in earlier:
        label = f"job {e.get('job', '?')} ({e.get('run', '')})".replace(" ()", "")
        before = FitDefinition(tuple(e["definition"]["sites"]), e["definition"]["rows"])
        if before != definition:
            changed = "; ".join(definition.differences(before))
            raise ReleaseRefused(
                f"{site}: release log: {label} already released an exact {e.get('method')} fit over another row set "
                f"({changed}); the two together would reveal the rows in between"
            )
        if e.get("method") == method and dict(e.get("grid") or {}) != dict(grid):
            raise ReleaseRefused(
                f"{site}: release log: {label} released {method} on another grid ({e.get('grid')} then {dict(grid)}); "
                "two grids together would move patients across the edges the first one hid"
            )
        changed_values = [v for v, d in values.items() if v in (e.get("values") or {}) and e["values"][v] != d]
        if changed_values:
            raise ReleaseRefused(
                f"{site}: release log: variable '{changed_values[0]}' changed since {label} released a fit of it; "
                "two fits over changed values differ by the change"
            )


def _admit_fit(
    log: ReleaseLog,
    method: str,
    definition: FitDefinition,
    grid: Mapping,
    values: Mapping[str, str],
    job: str,
    run: str = "",
) -> None:
    with log._locked():
        everything = log.entries()
        fits = [e for e in everything if e.get("kind") == "fit"]
        _admit_fit_check(log.site, method, definition, grid, values, fits)
        if any(run and e.get("run") == run and e.get("method") == method for e in fits):
            return  # this run is already recorded (a later round of the same fit)
        everything.append(
            {
                "kind": "fit",
                "method": method,
                "job": job,
                "run": run,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
                "definition": definition.to_dict(),
                "grid": dict(grid),
                "values": dict(values),
            }
        )
        tmp = log.path.with_name(f".{LOG_FILE}.tmp")
        write_private(tmp, json.dumps({"site": log.site, "releases": everything}, indent=1))
        os.replace(tmp, log.path)
