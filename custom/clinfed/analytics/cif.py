"""Cumulative incidence with competing risks (Aalen–Johansen) per group, from per-bin counts summed over sites.

Why bins (as `km`): the Aalen–Johansen estimator is a function of the numbers of events of each
cause and of censorings at each time; with times rounded up to a shared `time_bin` these are
per-bin counts, sums a site can encrypt. The curves are then exactly lifelines'
`AalenJohansenFitter` on the pooled table with binned times (the tests check this), not an
approximation of it. Tied event times are no problem for the estimator: events of several causes
in one bin give the same increments whether taken together or one after another.

Site vector (`cif_site_local`), G groups × (C causes + 1) × K bins, length G·(C+1)·K:
``[group 0: cause 0 events[0..K-1], …, cause C-1 events, censored[0..K-1], group 1: …]``.
A row is an event of cause c when its event flag is set and its cause column holds the c-th of the
job's named causes; an event with any other (or no) cause counts under the last cause, ``other``.

Result per group: for each released bin end, the number at risk and CIF_c(t) = Σ_{s≤t} S(s−)·d_c(s)/n(s)
for every cause (S the all-cause Kaplan–Meier curve). No confidence bands are released.

Test across groups: for each cause, the cause-specific log-rank test (events of the other causes
treated as censored), which is the score test of a cause-specific Cox model with the group as its
covariate (Breslow ties); as lifelines' `multivariate_logrank_test` on that cause's events. Gray's
test of the subdistributions is not offered. Like `km.logrank`, from the counts before merging.

Small cells: bins are merged forward until every released count (each cause's events, censorings,
at risk) is 0 or ≥ the minimum cell; censorings short of it are deferred to the next released bin;
a tail that never reaches it is released as censored at the last released bin, and a group too small
for even one bin is withheld (`km.enforce_min_cell`'s rules, with one events row per cause).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from clinfed.analytics.crosstab import level_texts
from clinfed.analytics.federated import Table, sum_site_vectors
from clinfed.analytics.km import ALL, bin_index, logrank

OTHER = "other"


def cif_site_local(
    time: np.ndarray,
    event: np.ndarray,
    cause: Sequence[Any],
    group: Sequence[Any] | None,
    *,
    causes: Sequence[str],
    levels: Sequence[str],
    time_bin: float,
    n_bins: int,
) -> np.ndarray:
    """Per group, cause and bin, this site's events (and censorings): the vector it encrypts.

    `causes` ends with ``other`` (events whose cause is none of the named ones). Times beyond the
    horizon are censored at the last bin, as `km.km_site_local` does.
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=float) > 0
    named = list(causes[:-1])
    c = level_texts(cause)
    which = np.full(time.shape, len(named), dtype=np.int64)
    for i, name in enumerate(named):
        which[c == str(name)] = i
    g = np.full(time.shape, ALL, dtype=object) if group is None else level_texts(group)
    k = bin_index(time, time_bin)
    over = k > n_bins
    ev = event & ~over
    k = np.minimum(k, n_bins) - 1
    out = np.zeros((len(levels), len(causes) + 1, n_bins))
    for gi, level in enumerate(levels):
        rows = g == str(level)
        for ci in range(len(causes)):
            out[gi, ci] = np.bincount(k[rows & ev & (which == ci)], minlength=n_bins)
        out[gi, -1] = np.bincount(k[rows & ~ev], minlength=n_bins)
    return out.ravel()


class Released(NamedTuple):
    """One group's released bins (`end`: 1-based last original bin) and what merging did."""

    end: np.ndarray
    events: np.ndarray  # (C, m)
    censored: np.ndarray
    at_risk: np.ndarray
    note: str


def _ok(v: float, m: int) -> bool:
    return v == 0 or v >= m


def merge_bins(counts: np.ndarray, min_cell: int) -> Released:
    """`km.enforce_min_cell` with C events rows: (C+1, K) counts → bins whose every count is 0 or ≥ min."""
    counts = np.rint(np.asarray(counts, dtype=float))
    n_causes = counts.shape[0] - 1
    ends: list[int] = []
    ev: list[np.ndarray] = []
    ce: list[float] = []
    acc = np.zeros(n_causes)
    acc_c = carried = deferred = 0.0
    merged = span = 0
    for k in range(counts.shape[1]):
        d, c = counts[:-1, k], counts[-1, k]
        if not d.any() and c == 0 and span == 0:
            continue
        acc, acc_c, span = acc + d, acc_c + c, span + (1 if (d.any() or c) else 0)
        events_ok = acc.any() and all(_ok(v, min_cell) for v in acc)
        if events_ok or (not acc.any() and acc_c >= min_cell):
            carry = acc_c if acc_c < min_cell else 0.0
            ends.append(k + 1)
            ev.append(acc.copy())
            ce.append(acc_c - carry)
            merged += span - 1
            deferred += max(0.0, carry - carried)
            acc, acc_c, carried, span = np.zeros(n_causes), carry, carry, 0
    notes = []
    if acc.any() or acc_c:
        tail = acc.sum() + acc_c
        while ends and ce[-1] + tail < min_cell:
            ends.pop()
            tail += ev.pop().sum() + ce.pop()
        if not ends:
            return Released(np.zeros(0, int), np.zeros((n_causes, 0)), np.zeros(0), np.zeros(0), "withheld")
        ce[-1] += tail
        notes.append(f"tail truncated after bin {ends[-1]}: its patients released as censored there")
    events = np.array(ev).T.reshape(n_causes, -1)
    censored = np.array(ce)
    at_risk = (events.sum(axis=0) + censored)[::-1].cumsum()[::-1]
    if deferred:
        notes.insert(0, "censorings under the minimum cell deferred to the next released bin")
    if merged:
        notes.insert(0, f"{merged} bins merged into later ones")
    return Released(np.array(ends, dtype=int), events, censored, at_risk, "; ".join(notes) or "none")


def cif_curves(table: Released, causes: Sequence[str], time_bin: float) -> dict[str, Any]:
    """Number at risk and the Aalen–Johansen CIF of every cause at each released bin end."""
    d_all = table.events.sum(axis=0)
    n = table.at_risk
    with np.errstate(divide="ignore", invalid="ignore"):
        hazard = np.where(n > 0, d_all / np.where(n > 0, n, 1), 0.0)
        surv = np.cumprod(1.0 - hazard)
        before = np.concatenate([[1.0], surv[:-1]])
        inc = before * np.where(n > 0, table.events / np.where(n > 0, n, 1), 0.0)
    return {
        "time": (table.end.astype(float) * time_bin).tolist(),
        "at_risk": n.astype(int).tolist(),
        "cif": {str(c): np.cumsum(inc[i]).tolist() for i, c in enumerate(causes)},
    }


def cif_combine(
    summed: np.ndarray,
    *,
    causes: Sequence[str],
    levels: Sequence[str],
    time_bin: float,
    n_bins: int,
    min_cell: int = 1,
) -> tuple[dict[str, Any], dict[str, str]]:
    """(summary.json's `cif`, what small-cell control did per group) from the summed site vectors."""
    counts = np.rint(np.asarray(summed, dtype=float)).reshape(len(levels), len(causes) + 1, n_bins)
    groups: dict[str, Any] = {}
    notes: dict[str, str] = {}
    released = []
    for gi, level in enumerate(levels):
        table = merge_bins(counts[gi], min_cell)
        notes[str(level)] = table.note
        if table.end.size:
            groups[str(level)] = cif_curves(table, causes, time_bin)
            released.append(gi)
    tests = None
    if len(released) >= 2:
        c = counts[released]
        at_risk = c.sum(axis=1)[:, ::-1].cumsum(axis=1)[:, ::-1]
        tests = {}
        for ci, cause in enumerate(causes):
            if c[:, ci].sum() > 0:
                tests[str(cause)] = logrank(c[:, ci, :], at_risk)
    result = {
        "time_bin": time_bin,
        "causes": list(map(str, causes)),
        "groups": groups,
        "test": "cause-specific log-rank" if tests is not None else None,
        "tests": tests,
    }
    return result, notes


def fit_federated(
    site_tables: Mapping[str, Table],
    *,
    causes: Sequence[str],
    cause_col: str,
    time_bin: float,
    n_bins: int,
    group_col: str | None = None,
    levels: Sequence[str] | None = None,
    min_cell: int = 1,
) -> tuple[dict[str, Any], dict[str, str]]:
    """`cif` over sites with plain sums standing in for the encrypted ones (`causes` ends with ``other``)."""
    levels = list(levels) if group_col else [ALL]
    vectors = {
        s: cif_site_local(
            np.asarray(t["time"], dtype=float),
            np.asarray(t["event"], dtype=float),
            np.asarray(t[cause_col], dtype=object),
            np.asarray(t[group_col], dtype=object) if group_col else None,
            causes=causes,
            levels=levels,
            time_bin=time_bin,
            n_bins=n_bins,
        )
        for s, t in site_tables.items()
    }
    return cif_combine(
        sum_site_vectors(vectors), causes=causes, levels=levels, time_bin=time_bin, n_bins=n_bins, min_cell=min_cell
    )
