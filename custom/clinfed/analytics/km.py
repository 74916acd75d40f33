"""Kaplan–Meier curves, log-rank test and median survival from per-bin counts summed over sites.

Why bins: a Kaplan–Meier curve is a product over event times, and exact event times are patient
level data. Rounding every time *up* to the end of a shared `time_bin` (a time of 31 days with
30-day bins becomes 60) turns the curve into a function of per-bin counts, which are sums a site
can encrypt and the server can add. The result is then exactly what lifelines gives on the pooled
table with binned times (the tests check this), not an approximation of it.

Layout of a site's vector (`km_site_local`), G groups × K bins, length 2·G·K:
``[group 0: events[0..K-1], censored[0..K-1], group 1: …]``. At-risk counts are not sent: at bin k
they are the group's total minus everyone who left in earlier bins, all derivable from the sums.

Small cells: a released per-bin count of 1 or 2 can single out a patient. `enforce_min_cell`
merges adjacent bins (again rounding event times up, to the merged bin's end) and defers small
numbers of censorings to the next released bin, until each released count (events, censored, at
risk) is 0 or ≥ the minimum cell; a tail that cannot reach the minimum is truncated (its patients
released as censored at the last released bin, where the curve then ends), and a group too small
to release at all is withheld. The released curve is lifelines' curve on the same data with
times so moved (the tests check this too); with a minimum cell of 1 nothing changes.

Definitions follow lifelines 0.30 exactly:
- survival: product-limit over released bins; censored at t are at risk at t;
- CI: exponential Greenwood ("log-log") bounds, a term d/(n(n−d)) with n = d counted as 0;
- median (and its CI): the first released time at which S(t) (the lower, the upper bound) is
  ≤ 0.5, as `lifelines.utils.qth_survival_times`; never reached is `None` (lifelines: inf);
- log-rank: `multivariate_logrank_test` (G−1 df; with two groups it equals `logrank_test`), from
  the *released* tables (after small-cell merging: computed before it, χ² leaked where merged
  events were); with nothing merged that is the binned data's χ².
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

from clinfed.analytics.federated import Table, sum_site_vectors

ALL = "all"


def bin_index(time: np.ndarray, time_bin: float) -> np.ndarray:
    """1-based bin of each time, rounding up to a bin end: (0, b] → 1, (b, 2b] → 2, …; time 0 → bin 1.

    Rounded to 9 decimals before the ceiling so 60 days in 30-day bins is bin 2, not 3 through a
    floating-point 2.0000000000000004.
    """
    if time_bin <= 0:
        raise ValueError(f"time bin must be positive, got {time_bin}")
    t = np.asarray(time, dtype=float)
    if np.any(t < 0):
        raise ValueError("negative survival time")
    return np.maximum(1, np.ceil(np.round(t / time_bin, 9))).astype(np.int64)


def n_bins_for(max_time: float, time_bin: float) -> int:
    """Bins needed to hold times up to `max_time` (the horizon the sites agree on)."""
    return int(bin_index(np.array([max_time]), time_bin)[0])


def isotonic_increasing(y: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to `y` in least squares (pool adjacent violators)."""
    values: list[float] = []
    weights: list[int] = []
    for v in np.asarray(y, dtype=float):
        values.append(float(v))
        weights.append(1)
        while len(values) > 1 and values[-2] > values[-1]:
            w = weights[-2] + weights[-1]
            values[-2] = (values[-2] * weights[-2] + values[-1] * weights[-1]) / w
            weights[-2] = w
            values.pop()
            weights.pop()
    return np.repeat(values, weights)


def consistent_counts(noisy: np.ndarray, n_rows: int) -> np.ndarray:
    """Noisy per-bin counts (`n_rows` rows of bins, flat) made non-negative integers, without bias.

    Why not clip each bin at 0: most bins of a fine grid are empty, and max(0, noise) adds ~0.4σ
    to every one of them (a 500-patient table came back with 857 at σ = 4). Instead each row's
    cumulative count, which is non-decreasing in truth, is fitted by isotonic regression from 0,
    rounded, and differenced (Hay et al., "Boosting the accuracy of differentially private
    histograms through consistency", 2010): non-negative integer counts, pure post-processing.
    """
    rows = np.asarray(noisy, dtype=float).reshape(n_rows, -1)
    out = np.empty_like(rows)
    for i, row in enumerate(rows):
        cum = np.rint(np.maximum(isotonic_increasing(np.cumsum(row)), 0.0))
        out[i] = np.diff(cum, prepend=0.0)
    return out.ravel()


def km_site_local(
    time: np.ndarray,
    event: np.ndarray,
    group: np.ndarray | None,
    *,
    levels: Sequence[str],
    time_bin: float,
    n_bins: int,
) -> np.ndarray:
    """Per group and bin, the site's counts of events and censorings: the vector it encrypts.

    Times beyond the horizon `n_bins · time_bin` are censored at the last bin (administrative
    censoring): the curve up to the horizon is unchanged by it. Rows whose group is not among
    `levels` are ignored (the job names the levels it reports).
    """
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=float)
    if group is None:
        group = np.full(time.shape, ALL, dtype=object)
        levels = [ALL]
    group = np.asarray(group).astype(str)
    k = bin_index(time, time_bin)
    over = k > n_bins
    ev = (event > 0) & ~over
    k = np.minimum(k, n_bins) - 1
    out = np.zeros((len(levels), 2, n_bins))
    for gi, level in enumerate(levels):
        rows = group == str(level)
        out[gi, 0] = np.bincount(k[rows & ev], minlength=n_bins)
        out[gi, 1] = np.bincount(k[rows & ~ev], minlength=n_bins)
    return out.ravel()


class MinCell(NamedTuple):
    """One group's released bins after small-cell control (`end` is the 1-based last original bin)."""

    end: np.ndarray
    events: np.ndarray
    censored: np.ndarray
    at_risk: np.ndarray
    note: str


def _ok(count: float, min_cell: int) -> bool:
    return count == 0 or count >= min_cell


def enforce_min_cell(counts: np.ndarray, min_cell: int) -> MinCell:
    """Merge adjacent bins so every released events, censored and at-risk count is 0 or ≥ `min_cell`.

    `counts` is one group's (2, K) array of events and censorings per bin. Empty bins are not
    released (as lifelines lists only observed times). Walking forward, bins are pooled until
    they hold ≥ `min_cell` events (or no events and ≥ `min_cell` censorings): events are then
    released at the pooled bin's end, i.e. rounded up further. Censorings short of the minimum
    are deferred to the next released bin (those patients stay at risk a little longer) rather
    than holding back the events, which would move the curve far more. At-risk counts follow:
    each released bin holds ≥ `min_cell` patients and at-risk at a bin counts its own and every
    later bin's. A tail that never reaches the minimum is truncated: its patients are released as
    censored at the last released bin (they were at risk there, so the curve up to it is
    unchanged and simply ends there), one bin earlier if that bin's censored count would stay
    under the minimum. With no bin left, the group is one bin if that is releasable, and
    otherwise releases nothing. `note` says what was done, for the provenance of the released table.
    """
    counts = np.rint(np.asarray(counts, dtype=float)).reshape(2, -1)
    if min_cell < 1:
        raise ValueError(f"minimum cell must be ≥ 1, got {min_cell}")
    ends: list[int] = []
    ev: list[float] = []
    ce: list[float] = []
    acc_d = acc_c = 0.0
    merged = 0
    deferred = carried_in = 0.0
    span = 0
    for k in range(counts.shape[1]):
        d, c = counts[0, k], counts[1, k]
        if d == 0 and c == 0 and span == 0:
            continue
        acc_d, acc_c, span = acc_d + d, acc_c + c, span + (1 if (d or c) else 0)
        if acc_d >= min_cell or (acc_d == 0 and acc_c >= min_cell):
            carry = acc_c if acc_c < min_cell else 0.0
            ends.append(k + 1)
            ev.append(acc_d)
            ce.append(acc_c - carry)
            merged += span - 1
            deferred += max(0.0, carry - carried_in)
            acc_d, acc_c, carried_in = 0.0, carry, carry
            span = 0
    notes = []
    if acc_d or acc_c:
        tail_events, tail = acc_d, acc_d + acc_c
        # Truncate: the tail's patients were still at risk at the last released bin, so counting
        # them as censored there leaves the curve up to it exactly as it was. If that bin has no
        # censorings and the tail is too small to make its count reach the minimum, truncate one
        # bin earlier (the dropped bin's ≥ min_cell events then make the count large enough).
        while ends and ce[-1] + tail < min_cell:
            ends.pop()
            d_last, c_last = ev.pop(), ce.pop()
            tail_events += d_last
            tail += d_last + c_last
        if ends:
            ce[-1] += tail
            notes.append(
                f"tail truncated after bin {ends[-1]}: {int(tail)} patients ({int(tail_events)} events) "
                "released as censored there"
            )
        else:
            d_all, c_all = counts[0].sum(), counts[1].sum()
            if not (_ok(d_all, min_cell) and _ok(c_all, min_cell)):
                return MinCell(
                    np.zeros(0, int),
                    np.zeros(0),
                    np.zeros(0),
                    np.zeros(0),
                    f"withheld: {int(d_all + c_all)} patients cannot form bins of ≥ {min_cell}",
                )
            last_end = int(np.flatnonzero(counts.sum(axis=0))[-1]) + 1
            ends, ev, ce = [last_end], [d_all], [c_all]
            notes.append(f"all bins merged into one ending at bin {last_end}")
    events, censored = np.array(ev), np.array(ce)
    at_risk = (events + censored)[::-1].cumsum()[::-1]
    if deferred:
        notes.insert(0, f"{int(deferred)} censorings deferred to the next released bin")
    if merged:
        notes.insert(0, f"{merged} bins merged into later ones")
    return MinCell(np.array(ends, dtype=int), events, censored, at_risk, "; ".join(notes) or "none")


def _greenwood_bounds(surv: np.ndarray, var_sum: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """lifelines' exponential Greenwood bounds (`KaplanMeierFitter._bounds`), NaN → 1."""
    z = stats.norm.ppf(1 - alpha / 2)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.log(surv)
        lower = np.exp(-np.exp(np.log(-v) - z * np.sqrt(var_sum) / v))
        upper = np.exp(-np.exp(np.log(-v) + z * np.sqrt(var_sum) / v))
    return np.nan_to_num(lower, nan=1.0), np.nan_to_num(upper, nan=1.0)


def _first_at_or_below(times: np.ndarray, curve: np.ndarray, q: float = 0.5) -> float | None:
    """lifelines' `qth_survival_time`: first time with curve ≤ q; None where it never gets there."""
    hit = np.flatnonzero(curve <= q)
    return float(times[hit[0]]) if hit.size else None


def km_curve(table: MinCell, time_bin: float, alpha: float = 0.05) -> dict[str, Any]:
    """Survival, numbers at risk and median (95 % CI) for one group's released bins."""
    d, n = table.events, table.at_risk
    with np.errstate(divide="ignore", invalid="ignore"):
        surv = np.cumprod(np.where(n > 0, 1.0 - d / np.where(n > 0, n, 1), 1.0))
        term = d / (n * (n - d))
    term = np.where(np.isfinite(term), term, 0.0)
    lower, upper = _greenwood_bounds(surv, np.cumsum(term), alpha)
    times = table.end.astype(float) * time_bin
    # lifelines' curves start at t = 0 with S = 1 and bounds 1: it never hits 0.5 there.
    return {
        "time": times.tolist(),
        "survival": surv.tolist(),
        "at_risk": table.at_risk.astype(int).tolist(),
        "events": table.events.astype(int).tolist(),
        "censored": table.censored.astype(int).tolist(),
        "median": _first_at_or_below(times, surv),
        "median_ci": [_first_at_or_below(times, lower), _first_at_or_below(times, upper)],
    }


def logrank(events: np.ndarray, at_risk: np.ndarray) -> dict[str, float]:
    """Log-rank test across G groups from (G, K) events and numbers at risk, as lifelines computes it.

    χ² = (O−E)' V⁻ (O−E) over the first G−1 groups, V the hypergeometric covariance with the
    ties factor (n−d)/(n−1) (1 where n = 1), pseudo-inverse as lifelines uses; df = G−1.
    """
    events = np.asarray(events, dtype=float)
    at_risk = np.asarray(at_risk, dtype=float)
    g = events.shape[0]
    if g < 2:
        raise ValueError("the log-rank test needs at least two groups")
    d = events.sum(axis=0)
    n = at_risk.sum(axis=0)
    keep = n > 0
    d, n, events, at_risk = d[keep], n[keep], events[:, keep], at_risk[:, keep]
    expected = (at_risk * (d / n)).sum(axis=1)
    z = events.sum(axis=1) - expected
    with np.errstate(divide="ignore", invalid="ignore"):
        ties = np.where(n > 1, (n - d) / (n - 1), 1.0)
    f = ties * d / n**2
    v = -(at_risk * f) @ at_risk.T
    v[np.diag_indices(g)] += (at_risk * f * n).sum(axis=1)
    v = v[:-1, :-1]
    chi2 = float(z[:-1] @ np.linalg.pinv(v) @ z[:-1])
    df = g - 1
    return {"chi2": chi2, "df": df, "p": float(stats.chi2.sf(chi2, df))}


def km_combine(
    summed: np.ndarray,
    *,
    levels: Sequence[str],
    time_bin: float,
    n_bins: int,
    min_cell: int = 1,
    alpha: float = 0.05,
) -> tuple[dict[str, Any], dict[str, str]]:
    """The `km` result from the summed site vectors, and what small-cell control did per group.

    Returns ``(km, suppression)``: `km` is exactly summary.json's schema, ``{time_bin, groups:
    {LEVEL: {time, survival, at_risk, events, censored, median, median_ci}}, logrank: {chi2, df,
    p}}`` (`logrank` is None with fewer than two released groups); `suppression` maps each level
    to a note for the release's provenance ("none", bins merged, tail merged, or withheld).
    """
    levels = list(levels) if levels else [ALL]
    counts = np.rint(np.asarray(summed, dtype=float)).reshape(len(levels), 2, n_bins)
    groups: dict[str, Any] = {}
    notes: dict[str, str] = {}
    released: list[MinCell] = []
    for gi, level in enumerate(levels):
        table = enforce_min_cell(counts[gi], min_cell)
        notes[str(level)] = table.note
        if table.end.size:
            groups[str(level)] = km_curve(table, time_bin, alpha)
            released.append(table)
    test = None
    if len(released) >= 2:
        # From the released tables only (issue 23, item 5): computed from the counts before merging,
        # χ² would tell where in a merged bin its events were. Each released bin's counts sit at its end
        # bin; with nothing merged this is the raw table, so lifelines' test is matched exactly.
        c = np.zeros((len(released), 2, n_bins))
        for gi, table in enumerate(released):
            c[gi, 0, table.end - 1] = table.events
            c[gi, 1, table.end - 1] = table.censored
        ev = c[:, 0, :]
        at_risk = (c[:, 0, :] + c[:, 1, :])[:, ::-1].cumsum(axis=1)[:, ::-1]
        test = logrank(ev, at_risk)
    return {"time_bin": time_bin, "groups": groups, "logrank": test}, notes


def fit_federated(
    site_tables: Mapping[str, Table],
    *,
    time_bin: float,
    duration_col: str = "time",
    event_col: str = "event",
    group_col: str | None = None,
    levels: Sequence[str] | None = None,
    n_bins: int | None = None,
    min_cell: int = 1,
    alpha: float = 0.05,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Site-local counts → sum → `km_combine`, with a plain sum standing in for the encrypted one.

    Without `levels` / `n_bins` they are taken from the pooled data (the job configures them:
    the levels and the horizon are agreed before any count leaves a site).
    """
    data = {}
    for site, table in site_tables.items():
        t = np.asarray(table[duration_col], dtype=float)
        e = np.asarray(table[event_col], dtype=float)
        g = None if group_col is None else np.asarray(table[group_col]).astype(str)
        keep = ~(np.isnan(t) | np.isnan(e))
        if g is not None:
            keep &= (g != "nan") & (g != "None")
        data[site] = (t[keep], e[keep], None if g is None else g[keep])
    if group_col is None:
        levels = [ALL]
    elif levels is None:
        levels = sorted({str(v) for _, _, g in data.values() for v in np.unique(g)})
    if n_bins is None:
        n_bins = n_bins_for(max(float(t.max()) for t, _, _ in data.values() if t.size), time_bin)
    vectors = {
        site: km_site_local(t, e, g, levels=levels, time_bin=time_bin, n_bins=n_bins)
        for site, (t, e, g) in data.items()
    }
    return km_combine(
        sum_site_vectors(vectors), levels=levels, time_bin=time_bin, n_bins=n_bins, min_cell=min_cell, alpha=alpha
    )
