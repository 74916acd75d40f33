"""The everyday tests as strategies of the one encrypted-sums job: crosstab, ttest, correlation, cumulative incidence.

Each is one round of the generic protocol (`sums_fl`): every site sends its encrypted vector of
sums, the release site decrypts the pooled sum and releases. The math lives in `crosstab`,
`ttest`, `correlation` and `cif` (numpy only, tested against scipy, pandas and lifelines on the
pooled table); these classes only say which variables a site reads and how it vets what it sends
and releases.

Disclosure control, as the existing methods do: ≥ 3 contributing sites (the protocol), the site's
cell floor (the largest of the job's and every site's `min_cell`) applied by each method's combine
(crosstab refuses a table with a small cell; ttest withholds a small group; correlation a small
pair; cumulative incidence merges bins as Kaplan–Meier does), and the release log for the exact
counts crosstab, ttest and correlation release: the release site records them in its own
`local/release_log-<method>.json` and refuses a release over another set of sites or with other
counts for the same variables (`release_log`: the differencing of "3 sites, then 4"). Only the
release site consults its log here (one round: the other sites never see the release first), so a
server that names another release site for the second job is not stopped by it.

Output DP (``config["dp"]``, one Gaussian release charged to every site's ledger): crosstab and
cumulative incidence, whose one patient is one count (Δ₂ = 1); ttest and correlation sum
unbounded values and refuse it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from clinfed.analytics import cif, correlation, crosstab, km, ttest
from clinfed.analytics.crosstab import level_texts
from clinfed.analytics.methods import Method, SiteInfo, Step
from clinfed.analytics.release_log import CohortDefinition, ReleaseLog, data_digest
from clinfed.errors import SiteDataError, SiteRefusal


class _Logged(Method):
    """A one-round method whose exact counts go through each site's release log before they leave."""

    first_phase = "counts"
    max_rounds = 1

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self._site: SiteInfo | None = None
        self._rows = 0

    def read(self, site: SiteInfo) -> Any:
        self._site = site
        table = super().read(site)
        self._rows = len(next(iter(table.values()))) if table else 0
        return table

    def logged_cells(self, result: Mapping[str, Any]) -> dict[str, dict]:
        """The released counts in `release_log`'s cell structure, keyed by what they count."""
        raise NotImplementedError

    def vet_release(self, data: Any, result: dict[str, Any], sites: Sequence[str]) -> None:
        if self.dp is not None:
            return  # output DP's noise covers differencing; the ledger charges it
        self.admit_release(self._site, result, sites)

    def admit_release(self, site: SiteInfo | None, result: Mapping[str, Any], sites: Sequence[str]) -> None:
        """Check the release against `site`'s own release log for this method and record it."""
        if site is None:
            raise SiteRefusal("no site context to find the release log in")
        digest = data_digest(np.array([float(self._rows)]), [])
        definition = CohortDefinition.of(self.block, list(sites), "", {}, digest)
        log = ReleaseLog(site.root, site.name, name=f"release_log-{self.block}.json")
        log.admit(definition, self.logged_cells(result), job=site.job_label, run=site.run_id)


def _cells(counts: Sequence[int | None]) -> dict[str, dict]:
    return {"all": {"count": None, "histogram": [None if c is None else int(c) for c in counts]}}


class CrossTab(_Logged):
    """An r×c table of two categorical columns, χ² and (2×2) Fisher. Config: rows, cols, row_levels, col_levels."""

    block = "crosstab"
    dp_sensitivity = 1.0  # a patient is one count in one cell

    def variables(self) -> list[str]:
        return [self.config["rows"], self.config["cols"]]

    def load(self, table, site, min_cell):
        return np.asarray(table[self.config["rows"]], dtype=object), np.asarray(
            table[self.config["cols"]], dtype=object
        )

    def size(self, phase):
        return len(self.config["row_levels"]) * len(self.config["col_levels"])

    def site_local(self, data, phase, iterate):
        return crosstab.crosstab_site_local(*data, self.config["row_levels"], self.config["col_levels"])

    def clean_noisy(self, noisy):
        return np.maximum(np.rint(noisy), 0.0)

    def step(self, summed, phase, min_cell):
        try:
            result = crosstab.crosstab_combine(summed, self.config["row_levels"], self.config["col_levels"], min_cell)
        except crosstab.SmallCell as exc:
            raise SiteRefusal(str(exc)) from None
        return Step(result=result, n=result["n"], suppressed="none")

    def logged_cells(self, result):
        key = f"crosstab:{self.config['rows']}|{self.config['cols']}"
        grid = ["levels", *result["rows"], "×", *result["cols"]]
        return {key: {"grid": grid, "cells": _cells([c for row in result["table"] for c in row])}}


class TTest(_Logged):
    """Student's and Welch's t, one-way ANOVA of a numeric column by a group. Config: variable, group,
    levels, shift (the public centre)."""

    block = "ttest"

    def variables(self) -> list[str]:
        return [self.config["variable"], self.config["group"]]

    def load(self, table, site, min_cell):
        from clinfed.analytics.stats import numeric_column

        try:
            x = numeric_column(table[self.config["variable"]], self.config["variable"])
        except ValueError as exc:
            raise SiteDataError(f"{site}: {exc}") from None
        return x, np.asarray(table[self.config["group"]], dtype=object)

    def size(self, phase):
        return 3 * len(self.config["levels"])

    def site_local(self, data, phase, iterate):
        return ttest.ttest_site_local(*data, self.config["levels"], float(self.config.get("shift", 0.0)))

    def step(self, summed, phase, min_cell):
        result = ttest.ttest_combine(summed, self.config["levels"], float(self.config.get("shift", 0.0)), min_cell)
        n = sum(g["n"] for g in result["groups"].values())
        withheld = result["withheld"]
        note = (
            f"level(s) {', '.join(withheld)} withheld: fewer than the minimum cell {min_cell}" if withheld else "none"
        )
        return Step(result=result, n=n, suppressed=note)

    def logged_cells(self, result):
        counts = [(result["groups"].get(str(v)) or {}).get("n") for v in self.config["levels"]]
        key = f"n:{self.config['variable']}|{self.config['group']}"
        return {key: {"grid": ["levels", *map(str, self.config["levels"])], "cells": _cells(counts)}}


class CorrelationMethod(_Logged):
    """Pearson correlation and covariance matrices, n per pair. Config: variables, shift (public centres)."""

    block = "correlation"

    def variables(self) -> list[str]:
        return list(self.config["variables"])

    def load(self, table, site, min_cell):
        from clinfed.analytics.stats import numeric_column

        cols = []
        for name in self.variables():
            try:
                cols.append(numeric_column(table[name], name))
            except ValueError as exc:
                raise SiteDataError(f"{site}: {exc}") from None
        return np.column_stack(cols)

    def size(self, phase):
        return 6 * len(correlation.pairs(len(self.config["variables"])))

    def site_local(self, data, phase, iterate):
        return correlation.correlation_site_local(data, self.config.get("shift"))

    def step(self, summed, phase, min_cell):
        result = correlation.correlation_combine(summed, self.config["variables"], min_cell)
        n = max((c for row in result["n"] for c in row if c is not None), default=0)
        note = f"pair(s) {'; '.join(result['withheld'])} withheld" if result["withheld"] else "none"
        return Step(result=result, n=n, suppressed=note)

    def logged_cells(self, result):
        names = result["variables"]
        return {
            f"n:{names[i]}|{names[j]}": {"grid": ["pair"], "cells": _cells([result["n"][i][j]])}
            for i, j in correlation.pairs(len(names))
        }


class CumulativeIncidence(Method):
    """Aalen–Johansen cumulative incidence per cause and group, cause-specific log-rank tests.

    Config: cause (column), causes (the named causes, then ``other``), group (column or None),
    levels, time_bin, n_bins.
    """

    block = "cif"
    first_phase = "counts"
    dp_sensitivity = 1.0  # a patient is one event of one cause, or one censoring, in one bin of one group

    @property
    def levels(self) -> list[str]:
        return list(self.config.get("levels") or [km.ALL]) if self.config.get("group") else [km.ALL]

    def variables(self) -> list[str]:
        group = self.config.get("group")
        return ["time", "event", self.config["cause"], *([group] if group else [])]

    def load(self, table, site, min_cell):
        t = np.asarray(table["time"], dtype=float)
        e = np.asarray(table["event"], dtype=float)
        keep = ~np.isnan(t) & ~np.isnan(e)
        group = self.config.get("group")
        g = None
        if group:
            g = level_texts(np.asarray(table[group], dtype=object))
            keep &= g != None  # noqa: E711  (elementwise: rows without a group value)
            g = g[keep]
        return t[keep], e[keep], np.asarray(table[self.config["cause"]], dtype=object)[keep], g

    def size(self, phase):
        return len(self.levels) * (len(self.config["causes"]) + 1) * int(self.config["n_bins"])

    def site_local(self, data, phase, iterate):
        t, e, c, g = data
        return cif.cif_site_local(
            t,
            e,
            c,
            g,
            causes=self.config["causes"],
            levels=self.levels,
            time_bin=float(self.config["time_bin"]),
            n_bins=int(self.config["n_bins"]),
        )

    def clean_noisy(self, noisy):
        return km.consistent_counts(noisy, len(self.levels) * (len(self.config["causes"]) + 1))

    def step(self, summed, phase, min_cell):
        result, notes = cif.cif_combine(
            summed,
            causes=self.config["causes"],
            levels=self.levels,
            time_bin=float(self.config["time_bin"]),
            n_bins=int(self.config["n_bins"]),
            min_cell=min_cell,
        )
        return Step(result=result, n=round(float(np.sum(summed))), suppressed=notes)
