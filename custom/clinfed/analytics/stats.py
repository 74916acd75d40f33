"""Federated cohort statistics, FLARE-free: per-site partial sums, packing, suppression, output DP.

The arithmetic of `cohort_stats`, kept apart from the components that move it (`cohort_method.py`, the
strategy the generic encrypted-sums job `sums_fl.py` runs) and from where its rows come from
(`cohort_data.py`), as `clinfed.he` keeps the CKKS codec apart from the aggregator. numpy (and scipy
for exact intervals) only: no FLARE import.

1. **Pass 1** (:func:`local_sums`): each site packs, for every group and feature, the row count,
   the count of present values, their sum and a fixed-bin histogram into *one* flat vector
   (``groups × (1 + 2F + F·bins)`` values: 3 × 361 = 1 083 for the bundled data, one CKKS
   ciphertext of 2 048 slots). Sums are divided by each feature's public bound (``scale``), so
   every slot stays near or below the row count, far under ``max_abs_value`` (2^20 at the default
   parameters) however large the clinical units (``worst area`` reaches 4 254).
2. **Pass 2** (:func:`local_deviations`): once the pooled mean is known (sites decrypt the pass-1
   sum), each site sends Σ(x − mean)² / scale². Two passes, as FLARE's federated statistics do,
   because Σx² − n·mean² cancels catastrophically when mean ≫ std (DESIGN.md, "Numerics").
3. **Release** (:func:`release`): one key-holding site turns the two decrypted sums into count,
   mean, std (ddof=1) and histograms, optionally adds calibrated noise (:func:`noise_plan`), then
   withholds small cells (:func:`suppress`). Only that release leaves the sites.

Counts travel as floats through CKKS (approximate arithmetic, error ~1e-8 here) and are rounded
back; :func:`unpack_sums` refuses a vector whose counts are not near whole numbers, which is what a
wrapped-around (overflowed) or corrupted sum looks like.

Three rules hold whatever a job asks (issue 12, items 6-8):

* **At least** :data:`MIN_CONTRIBUTORS` **(3) sites in every sum.** Each site packs a constant 1 in
  the last slot of both vectors, so the decrypted slot is the number of vectors in the sum, read by the
  key holders rather than claimed by the server; :func:`release` refuses fewer. (It stops a server that
  closes a pass early or misstates who took part; a server that actively encrypts a forged slot with
  the public key is outside the honest-but-curious model, DESIGN.md.)
* **Nothing decrypted leaves at full precision.** CKKS decryptions carry the scheme's error in their
  low bits, and whoever holds the ciphertext and the decrypted value can recover the secret key from
  it (Li & Micciancio, EUROCRYPT 2021). Counts are released as exact integers; every mean and std is
  rounded to :data:`SIGNIFICANT_DIGITS` (7) significant digits, a grid about 10-1000× coarser than the
  CKKS error of these sums (measured: ≤ 1e-8 relative, median 7e-11) and well inside the 1e-6
  relative accuracy promised. What can still leak is whether the error pushed a value across a
  rounding boundary: at most one bit, for the rare value within ~1e-8 of one.
* **The residual is a group.** Rows whose label matches no declared group are in ``all`` only, so
  ``all`` minus the declared groups is their statistics; :func:`suppress` treats them as one more
  (unpublished) partition group, withheld when small, and ``all`` is withheld when it would give a
  withheld residual back. Cross-job differencing is `clinfed.analytics.release_log`'s.

**Quantiles** (median, q25, q75; issue 13). With ``quantile_bins`` Q > 0 each site also packs a
*fine* histogram (Q equal bins over the same public bounds, Q a multiple of ``bins``) per group and
feature into pass 1: G·F·Q more slots (3 × 30 × 200 = 18 000 for the bundled data, so the pass-1
vector grows from 1 ciphertext of 2 048 slots to 10). The release site turns the exact pooled fine
counts into quantiles (:func:`histogram_quantile`) and never releases the fine histogram itself:

* *Interpolation*: ``np.quantile``'s default (linear) method interpolates between the order
  statistics x₍⌊h⌋₎ and x₍⌈h⌉₎, h = (n − 1)·q. Each order statistic x₍k₎ is placed inside the fine
  bin that holds rank k, at its rank's midpoint there (e_b + (k − C_{b−1} + ½)/c_b · w: the bin's
  values taken as evenly spread), and the two are combined with np.quantile's weights. Both the
  true and the estimated order statistic lie in the same bin, so the estimate is within one fine
  bin width w of np.quantile (for values inside the public bounds; values past them sit in the
  edge bins and can be off by more).
* *Rounding*: the estimate is then rounded to the nearest fine-bin edge, so the decrypted CKKS
  error never reaches the release and a quantile carries no more than "which fine bin": total error
  < 1.5·w, i.e. < 0.75 % of the feature's public range at Q = 200.
* *Why this does not undo cell suppression*: a quantile is released only where its rank falls in
  a coarse cell whose place in the cumulative count is already public (:func:`quantile_cells`):
  a released cell below every withheld cell of that histogram or above all of them. That the rank
  lies in that cell is then derivable from the released histogram alone; the quantile adds only
  where, on the fine grid, inside a released cell (≥ ``min_cell`` records) one order statistic sits:
  an inequality on unreleased fine counts of a released cell, never an equation on a withheld cell.
  Whether it is released depends on public numbers only (released counts and which cells are
  withheld), so a null reveals nothing either. Quantiles of a withheld group, feature or histogram
  are null. Across releases and groups quantiles add only such inequalities; the release log's
  exact-derivability check (`release_log`) is about equations and is unaffected. What a quantile
  does tell: a median of an odd count *is* one patient's value, and it is released to the fine grid
  (one bin, 0.5 % of the range at Q = 200), as any median is; the group holds ≥ ``min_cell`` rows.
  The rule is strict: where withheld cells sit on both sides of a rank's cell (small tails at both
  ends) the quantile is null even when the split of the withheld total would barely matter (on the
  bundled data at ``min_cell`` 10, 104 of 270 are null; on flchain none).
* *Under output DP* quantiles are withheld (null): the fine histogram is not noised or charged, so
  it must not reach a DP release (the job also packs no fine histogram then).

**Proportions and incidence rates** (issue 13). ``proportions`` (categorical columns with public
levels) and ``rate`` (an event and a time column) add one more block per group to pass 1, after every
group's block: the count of each level, then [patients, events, Σtime / ``rate_bound``] over rows with
both (:func:`_extra_sums`). Person-time can exceed the CKKS slot bound, so it travels divided by the
public time bound, like the feature sums, and comes back to far better than the 7 released digits.
The release (:func:`release_extras`) gives per group and level the count, proportion and exact
Clopper–Pearson 95 % CI (:func:`clopper_pearson`), and per group events, person-time, rate per
``rate_per`` and the exact Poisson (Garwood) CI (:func:`poisson_exact`). Disclosure control
(:func:`suppress_extras`) is the histogram cells' rule: a level count or a rate's events below the
minimum cell is withheld, and every line whose total is public (a group's levels of one column; a
level, or the rate, across ``all`` and the partition, the residual included) hides none or at least
two cells. Neither is in the DP noise plan: a DP release with them is refused (:data:`EXTRAS_UNDER_DP`).

Histograms use fixed, public bin edges (``bins`` equal bins over each feature's public bounds),
not FLARE's default of bins over the federation's min/max: a global min and max are themselves
two patients' exact values. Values outside the bounds are counted in the edge bins.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from clinfed.analytics import output_dp

ALL = "all"
#: rows whose group label matches no declared group: never published, but ``all`` minus the declared
#: groups gives it away, so suppression treats it as a group of its own (see :func:`suppress`).
RESIDUAL = "(rows in no declared group)"
#: fewest sites an aggregate may be released from: with two, each subtracts its own part and reads the
#: other's. A constant of the code, not a job argument (DESIGN.md, threat model).
MIN_CONTRIBUTORS = 3
#: significant digits of every released mean and std (see :func:`round_release`).
SIGNIFICANT_DIGITS = 7
MECHANISMS = ("laplace", "gaussian")
#: share of ε (and δ) spent on each family of released values; the sum is 1.
DEFAULT_SPLIT = {"count": 0.1, "sum": 0.3, "m2": 0.3, "histogram": 0.3}
#: keys of a released group beside its features (so no feature may carry these names)
PROPORTIONS_KEY, RATE_KEY = "proportions", "rate"
RESERVED_KEYS = (PROPORTIONS_KEY, RATE_KEY)
#: two-sided confidence level of the released proportion and rate intervals
CONFIDENCE = 0.95
EXTRAS_UNDER_DP = (
    "cohort_stats: proportions and incidence rates are not released under output DP (epsilon): "
    "their counts are not in the noise plan; drop them or the epsilon"
)


# --- what every site and the server must agree on ---------------------------------------------------
@dataclass(frozen=True)
class StatsSpec:
    """Groups, features, public bounds and bins: fixes the packed layout and the bin edges.

    ``groups[0]`` must be ``"all"`` (every row); the other groups partition rows by a group column.
    Bounds are public knowledge (a documented clinical range), never the data's own min/max.
    """

    features: tuple[str, ...]
    bounds: tuple[tuple[float, float], ...]
    groups: tuple[str, ...] = (ALL, "malignant", "benign")
    bins: int = 10
    #: fine bins per feature for the quantiles (0: none, the pass-1 layout as before issue 13)
    quantile_bins: int = 0
    #: categorical columns and their public levels, ((column, (level, ...)), ...): counts per level
    proportions: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: (event column, time column) of an incidence rate (events per person-time); None: no rate
    rate: tuple[str, str] | None = None
    #: public bound on one patient's time at risk: the person-time sum travels divided by it
    rate_bound: float = 1.0
    #: the rate is released per ``rate_per`` units of person-time (e.g. 1000 person-days)
    rate_per: float = 1.0
    #: what a unit of person-time is, as text for the reader (e.g. "person-days")
    rate_unit: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(str(f) for f in self.features))
        object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))
        object.__setattr__(self, "bounds", tuple((float(lo), float(hi)) for lo, hi in self.bounds))
        if not self.features:
            raise ValueError("no features to summarise")
        if len(set(self.features)) != len(self.features):
            raise ValueError("feature names are not unique")
        if len(self.bounds) != len(self.features):
            raise ValueError(f"{len(self.bounds)} bounds for {len(self.features)} features")
        for name, (lo, hi) in zip(self.features, self.bounds, strict=True):
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"feature '{name}': bounds ({lo}, {hi}) are not finite with lo < hi")
        if not self.groups or self.groups[0] != ALL or len(set(self.groups)) != len(self.groups):
            raise ValueError(f"groups must be unique and start with '{ALL}', got {list(self.groups)}")
        if not isinstance(self.bins, int) or self.bins < 1:
            raise ValueError(f"bins must be a positive integer, got {self.bins!r}")
        q = self.quantile_bins
        if not isinstance(q, int) or q < 0 or (q and q % self.bins):
            raise ValueError(f"quantile_bins must be 0 or a positive multiple of bins ({self.bins}), got {q!r}")
        self._check_extras()

    def _check_extras(self) -> None:
        props = tuple((str(c), tuple(str(v) for v in levels)) for c, levels in self.proportions)
        object.__setattr__(self, "proportions", props)
        taken = {*RESERVED_KEYS} & set(self.features)
        if taken:
            raise ValueError(f"a feature may not be named {sorted(taken)[0]!r} (a key of the release)")
        names = [c for c, _ in props]
        if len(set(names)) != len(names):
            raise ValueError("proportion columns are not unique")
        for c, levels in props:
            if not levels or len(set(levels)) != len(levels):
                raise ValueError(f"proportion column '{c}': its public levels must be unique and at least one")
        if self.rate is not None:
            rate = tuple(str(v) for v in self.rate)
            if len(rate) != 2 or rate[0] == rate[1]:
                raise ValueError(f"rate must name two columns (events, person-time), got {list(self.rate)}")
            object.__setattr__(self, "rate", rate)
        for name in ("rate_bound", "rate_per"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
            object.__setattr__(self, name, value)
        object.__setattr__(self, "rate_unit", str(self.rate_unit or ""))

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def lo(self) -> np.ndarray:
        return np.array([b[0] for b in self.bounds])

    @property
    def hi(self) -> np.ndarray:
        return np.array([b[1] for b in self.bounds])

    @property
    def scale(self) -> np.ndarray:
        """Per-feature divisor that brings every in-bounds value into [-1, 1] before packing."""
        return np.maximum(np.abs(self.lo), np.abs(self.hi))

    @property
    def edges(self) -> np.ndarray:
        """(F, bins + 1) public bin edges."""
        return np.linspace(self.lo, self.hi, self.bins + 1, axis=1)

    @property
    def fine_edges(self) -> np.ndarray:
        """(F, quantile_bins + 1) public edges of the fine (never released) quantile histogram."""
        return np.linspace(self.lo, self.hi, self.quantile_bins + 1, axis=1)

    @property
    def block(self) -> int:
        """Pass-1 values per group: rows, then count, scaled sum, histogram and fine histogram per feature."""
        return 1 + 2 * self.n_features + self.n_features * (self.bins + self.quantile_bins)

    @property
    def n_levels(self) -> int:
        """Levels over all proportion columns (one count slot each per group)."""
        return sum(len(levels) for _, levels in self.proportions)

    @property
    def extra_block(self) -> int:
        """Pass-1 values per group after every group's block: level counts, then [patients, events,
        person-time / rate_bound] of the rate (0 values when the job asks for neither)."""
        return self.n_levels + (3 if self.rate is not None else 0)

    @property
    def has_extras(self) -> bool:
        return bool(self.proportions) or self.rate is not None

    @property
    def pass1_size(self) -> int:
        """Every group's block, every group's proportions/rate block, then the contributor slot (1 per
        site, so the sum counts the sites)."""
        return self.n_groups * (self.block + self.extra_block) + 1

    @property
    def pass2_size(self) -> int:
        """Σ(x − mean)² per group and feature, then the contributor slot."""
        return self.n_groups * self.n_features + 1

    def to_dict(self) -> dict:
        out = {
            "features": list(self.features),
            "bounds": [list(b) for b in self.bounds],
            "groups": list(self.groups),
            "bins": self.bins,
        }
        if self.quantile_bins:  # absent when 0, so a layout without quantiles keeps its digest
            out["quantile_bins"] = self.quantile_bins
        if self.proportions:  # likewise absent when unused
            out["proportions"] = [[c, list(levels)] for c, levels in self.proportions]
        if self.rate is not None:
            out["rate"] = {
                "event": self.rate[0],
                "time": self.rate[1],
                "bound": self.rate_bound,
                "per": self.rate_per,
                "unit": self.rate_unit,
            }
        return out

    @classmethod
    def from_dict(cls, d: Mapping) -> StatsSpec:
        return cls(
            features=tuple(d["features"]),
            bounds=tuple(tuple(b) for b in d["bounds"]),
            groups=tuple(d.get("groups", (ALL, "malignant", "benign"))),
            bins=int(d.get("bins", 10)),
            quantile_bins=int(d.get("quantile_bins", 0)),
            proportions=tuple((c, tuple(levels)) for c, levels in d.get("proportions", ())),
            rate=(d["rate"]["event"], d["rate"]["time"]) if d.get("rate") else None,
            rate_bound=float(d["rate"]["bound"]) if d.get("rate") else 1.0,
            rate_per=float(d["rate"]["per"]) if d.get("rate") else 1.0,
            rate_unit=str(d["rate"].get("unit", "")) if d.get("rate") else "",
        )

    def digest(self, **extra: object) -> str:
        """Identity of the layout (plus any ``extra`` settings): sites and server compare it so a site
        configured differently is refused by name rather than summed into nonsense."""
        doc = json.dumps({**self.to_dict(), **extra}, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(doc.encode()).hexdigest()[:16]


def nice_bounds(lo: float, hi: float, digits: int = 2) -> tuple[float, float]:
    """Round a reference range outward to ``digits`` significant digits (6.981 → 6.9, 28.11 → 29).

    Used to turn a public reference data set's range into published-looking bounds; rounding
    outward keeps every reference value inside, so nothing is clipped into an edge bin.
    """

    def out(v: float, up: bool) -> float:
        if v == 0:
            return 0.0
        step = 10.0 ** (math.floor(math.log10(abs(v))) - digits + 1)
        r = (math.ceil if up else math.floor)(round(v / step, 9)) * step
        return float(f"{r:.{digits + 2}g}")

    nlo, nhi = out(lo, up=False), out(hi, up=True)
    return (nlo, nhi) if nlo < nhi else (nlo, nlo + 1.0)


def reference_bounds(x: np.ndarray) -> list[tuple[float, float]]:
    """Public per-feature bounds from a public reference table (column min/max, rounded outward)."""
    return [nice_bounds(float(lo), float(hi)) for lo, hi in zip(np.nanmin(x, 0), np.nanmax(x, 0), strict=True)]


# --- site side: pass 1 and pass 2 --------------------------------------------------------------------
def _check_inputs(x: np.ndarray, masks: Mapping[str, np.ndarray], spec: StatsSpec) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != spec.n_features:
        raise ValueError(f"data has shape {x.shape}, expected (rows, {spec.n_features})")
    missing = [g for g in spec.groups if g not in masks]
    if missing:
        raise ValueError(f"no row mask for group(s) {missing}")
    for g in spec.groups:
        if np.shape(masks[g]) != (x.shape[0],):
            raise ValueError(f"group '{g}' mask has shape {np.shape(masks[g])}, expected ({x.shape[0]},)")
    if np.isinf(x).any():
        raise ValueError("data holds infinite values")
    return x


def histogram_counts(col: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of the present (non-NaN) values of one feature in fixed bins; out-of-range values land
    in the first or last bin. Bins are [e_i, e_{i+1}), the last one closed."""
    col = col[~np.isnan(col)]
    bins = len(edges) - 1
    idx = np.clip(np.searchsorted(edges, col, side="right") - 1, 0, bins - 1)
    return np.bincount(idx, minlength=bins).astype(np.float64)


def level_text(value: object) -> str | None:
    """A categorical cell as the text its level is named by (1, 1.0 and "1" are "1"); None when missing."""
    if value is None:
        return None
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return None
        if float(value).is_integer():
            return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    text = str(value).strip()
    return None if text.lower() in ("", "nan", "none", "null", "na") else text


def level_index(values: Sequence, levels: Sequence[str], column: str) -> np.ndarray:
    """Index of each value among the public ``levels`` (-1: missing). A value outside them is refused:
    every site must count the same levels (the message names the column, never the value)."""
    index = {lv: i for i, lv in enumerate(levels)}
    out = np.full(len(values), -1, dtype=np.int64)
    for i, v in enumerate(values):
        t = level_text(v)
        if t is None:
            continue
        if t not in index:
            with contextlib.suppress(ValueError):  # "1.0" written by another tool is the level "1"
                t = level_text(float(t))
        if t not in index:
            raise ValueError(f"column '{column}' holds a value outside its {len(levels)} public levels")
        out[i] = index[t]
    return out


def numeric_column(values: Sequence, column: str) -> np.ndarray:
    """A column as float64 (missing: NaN); text that is not a number is refused, naming the column."""
    arr = np.asarray(values)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64)
    out = np.full(len(arr), np.nan)
    for i, v in enumerate(arr):
        if level_text(v) is None:
            continue
        try:
            out[i] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"column '{column}' is not numeric") from None
    return out


def _extra_sums(
    masks: Mapping[str, np.ndarray], spec: StatsSpec, columns: Mapping[str, Sequence] | None, n: int
) -> np.ndarray:
    """(G, extra_block) of one site: per group the count of each level of each proportion column, then
    the rate's [patients, events, person-time / rate_bound] over rows with both event and time."""
    out = np.zeros((spec.n_groups, spec.extra_block))
    if not spec.has_extras:
        return out
    columns = columns or {}
    wanted = [c for c, _ in spec.proportions] + list(spec.rate or ())
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise ValueError(f"no values given for column(s) {missing}")
    for c in wanted:
        if len(columns[c]) != n:
            raise ValueError(f"column '{c}' has {len(columns[c])} values for {n} rows")
    parts: list[tuple[int, int, np.ndarray]] = []
    start = 0
    for c, levels in spec.proportions:
        parts.append((start, len(levels), level_index(columns[c], levels, c)))
        start += len(levels)
    if spec.rate is not None:
        event = numeric_column(columns[spec.rate[0]], spec.rate[0])
        time = numeric_column(columns[spec.rate[1]], spec.rate[1])
        ok = ~np.isnan(event) & ~np.isnan(time)
        if not np.isin(event[ok], (0.0, 1.0)).all():
            raise ValueError(f"event column '{spec.rate[0]}' holds values other than 0 and 1")
        if (time[ok] < 0).any() or np.isinf(time[ok]).any():
            raise ValueError(f"person-time column '{spec.rate[1]}' holds negative or infinite values")
    for gi, g in enumerate(spec.groups):
        mask = np.asarray(masks[g], dtype=bool)
        for first, count, idx in parts:
            chosen = idx[mask]
            out[gi, first : first + count] = np.bincount(chosen[chosen >= 0], minlength=count)
        if spec.rate is not None:
            rows = mask & ok
            out[gi, start] = rows.sum()
            out[gi, start + 1] = event[rows].sum()
            out[gi, start + 2] = time[rows].sum() / spec.rate_bound
    return out


def local_sums(
    x: np.ndarray,
    masks: Mapping[str, np.ndarray],
    spec: StatsSpec,
    clip: bool = False,
    columns: Mapping[str, Sequence] | None = None,
) -> np.ndarray:
    """Pass-1 vector of one site: per group [rows, count_f, Σx_f / scale_f, histogram_f, fine histogram_f]
    (NaN = missing; the fine histograms only with ``spec.quantile_bins``), then per group the
    proportions/rate block (:func:`_extra_sums`, from ``columns``: name → values, when the spec asks).

    ``clip`` clamps values into the public bounds first: output DP needs it (it bounds what one
    record can change); without DP the sums stay exact even for values past the bounds. Person-time
    travels divided by the public ``rate_bound``, so a slot stays below the site's patient count.
    """
    x = _check_inputs(x, masks, spec)
    if clip:
        x = np.clip(x, spec.lo, spec.hi)  # NaN stays NaN
    scale, edges, fine_edges = spec.scale, spec.edges, spec.fine_edges
    out = np.zeros(spec.pass1_size)
    f, b, q = spec.n_features, spec.bins, spec.quantile_bins
    for gi, g in enumerate(spec.groups):
        rows = x[np.asarray(masks[g], dtype=bool)]
        base = gi * spec.block
        out[base] = rows.shape[0]
        present = ~np.isnan(rows)
        out[base + 1 : base + 1 + f] = present.sum(axis=0)
        out[base + 1 + f : base + 1 + 2 * f] = np.where(present, rows, 0.0).sum(axis=0) / scale
        hist = out[base + 1 + 2 * f : base + 1 + 2 * f + f * b].reshape(f, b)
        fine = out[base + 1 + 2 * f + f * b : base + spec.block].reshape(f, q)
        for j in range(f):
            hist[j] = histogram_counts(rows[:, j], edges[j])
            if q:
                fine[j] = histogram_counts(rows[:, j], fine_edges[j])
    if spec.has_extras:
        tail = spec.n_groups * spec.block
        out[tail:-1] = _extra_sums(masks, spec, columns, x.shape[0]).reshape(-1)
    out[-1] = 1.0  # this site, counted once in the sum
    return out


@dataclass
class Sums:
    """The pooled pass-1 aggregate in natural units: rows (G,), count (G,F), total (G,F), hist (G,F,B),
    fine (G,F,Q) (the quantile histograms, never released; None when the spec has none)."""

    rows: np.ndarray
    count: np.ndarray
    total: np.ndarray
    hist: np.ndarray
    contributors: int = 0  # vectors in the sum, from the contributor slot
    fine: np.ndarray | None = None
    #: (G, n_levels) counts per level of the proportion columns; None when the spec has none
    levels: np.ndarray | None = None
    #: (G, 3) the rate's [patients, events, person-time in natural units]; None without a rate
    rate: np.ndarray | None = None

    def means(self) -> np.ndarray:
        """(G, F) pooled means; NaN where a group has no value of a feature."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)


def _whole(values: np.ndarray, what: str) -> np.ndarray:
    """Round decrypted counts to integers; the message never quotes the decryption error (it is key material)."""
    rounded = np.rint(values)
    worst = float(np.max(np.abs(values - rounded), initial=0.0))
    if worst > 0.25 or (rounded < 0).any():
        raise ValueError(
            f"aggregated {what} are not non-negative whole numbers: the encrypted sum wrapped around or a "
            "site sent a corrupted vector"
        )
    return rounded.astype(np.int64)


def contributors(vec: np.ndarray, what: str = "sum") -> int:
    """How many site vectors a (decrypted) pass-1 or pass-2 sum holds: its last slot, one per site."""
    v = np.asarray(vec, dtype=np.float64).reshape(-1)
    return int(_whole(v[-1:], f"contributor count of the {what}")[0])


def check_contributors(count: int, what: str = "sum") -> None:
    """Refuse an aggregate of fewer than MIN_CONTRIBUTORS sites: with two, each reads the other's part."""
    if count < MIN_CONTRIBUTORS:
        raise ValueError(
            f"the {what} holds {count} site(s)' data; at least {MIN_CONTRIBUTORS} are needed before anything "
            "derived from it is decrypted or released"
        )


def unpack_sums(vec: np.ndarray, spec: StatsSpec) -> Sums:
    """Split a (decrypted) pass-1 sum back into natural units; counts rounded to whole numbers."""
    v = np.asarray(vec, dtype=np.float64).reshape(-1)
    if v.size != spec.pass1_size:
        raise ValueError(f"pass-1 vector has {v.size} values, expected {spec.pass1_size}")
    tail = spec.n_groups * spec.block
    blocks = v[:tail].reshape(spec.n_groups, spec.block)
    f, b, q = spec.n_features, spec.bins, spec.quantile_bins
    fine = None
    if q:
        fine = _whole(blocks[:, 1 + 2 * f + f * b :], "fine histogram counts").reshape(spec.n_groups, f, q)
    extra = v[tail:-1].reshape(spec.n_groups, spec.extra_block)
    levels = rate = None
    if spec.proportions:
        levels = _whole(extra[:, : spec.n_levels], "level counts")
    if spec.rate is not None:
        k = spec.n_levels
        counts = _whole(extra[:, k : k + 2], "rate patient and event counts")
        rate = np.column_stack([counts.astype(np.float64), np.maximum(extra[:, k + 2], 0.0) * spec.rate_bound])
    return Sums(
        rows=_whole(blocks[:, 0], "row counts"),
        count=_whole(blocks[:, 1 : 1 + f], "value counts"),
        total=blocks[:, 1 + f : 1 + 2 * f] * spec.scale,
        hist=_whole(blocks[:, 1 + 2 * f : 1 + 2 * f + f * b], "histogram counts").reshape(spec.n_groups, f, b),
        contributors=contributors(v, "pass-1 sum"),
        fine=fine,
        levels=levels,
        rate=rate,
    )


def local_deviations(
    x: np.ndarray, masks: Mapping[str, np.ndarray], means: np.ndarray, spec: StatsSpec, clip: bool = False
) -> np.ndarray:
    """Pass-2 vector of one site: per group and feature Σ(x − pooled mean)² / scale² (missing skipped).

    Groups or features with no pooled value (mean NaN) contribute 0.
    """
    x = _check_inputs(x, masks, spec)
    means = np.asarray(means, dtype=np.float64)
    if means.shape != (spec.n_groups, spec.n_features):
        raise ValueError(f"means have shape {means.shape}, expected {(spec.n_groups, spec.n_features)}")
    if clip:
        x = np.clip(x, spec.lo, spec.hi)
    out = np.zeros((spec.n_groups, spec.n_features))
    for gi, g in enumerate(spec.groups):
        rows = x[np.asarray(masks[g], dtype=bool)]
        dev = (rows - np.nan_to_num(means[gi])) / spec.scale
        out[gi] = np.where(np.isnan(dev) | np.isnan(means[gi]), 0.0, dev * dev).sum(axis=0)
    return np.append(out.reshape(-1), 1.0)  # the contributor slot


def unpack_deviations(vec: np.ndarray, spec: StatsSpec) -> np.ndarray:
    """(G, F) pooled Σ(x − mean)² in natural units."""
    v = np.asarray(vec, dtype=np.float64).reshape(-1)
    if v.size != spec.pass2_size:
        raise ValueError(f"pass-2 vector has {v.size} values, expected {spec.pass2_size}")
    return np.maximum(v[:-1].reshape(spec.n_groups, spec.n_features), 0.0) * spec.scale**2


# --- output differential privacy -------------------------------------------------------------------------
@dataclass(frozen=True)
class DPConfig:
    """Output DP for the release: ε (and δ for the Gaussian mechanism) for the whole release.

    Neighbouring data sets differ by one patient record (add/remove). The budget is split across
    the four families of released values: Laplace by basic composition of ε; Gaussian as shares of
    one RDP release at (ε, δ) (`output_dp.family_multipliers`); see :func:`noise_plan`.
    Known limit: noise is drawn in floating point (numpy, OS-seeded), whose low-order bits can leak
    (Mironov, CCS 2012); a snapping or discrete mechanism would close that, at more code.
    """

    epsilon: float
    mechanism: str = "laplace"
    delta: float = 0.0
    split: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_SPLIT))

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive number, got {self.epsilon!r}")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        if self.mechanism == "gaussian" and not 0 < self.delta < 1:
            raise ValueError(f"the Gaussian mechanism needs 0 < delta < 1, got {self.delta!r}")
        if self.mechanism == "laplace" and self.delta != 0:
            raise ValueError("the Laplace mechanism is pure ε-DP: leave delta at 0")
        if set(self.split) != set(DEFAULT_SPLIT) or any(v <= 0 for v in self.split.values()):
            raise ValueError(f"split must give a positive share to each of {sorted(DEFAULT_SPLIT)}")
        if not math.isclose(sum(self.split.values()), 1.0, rel_tol=1e-9):
            raise ValueError(f"split shares must add up to 1, got {sum(self.split.values())}")


@dataclass(frozen=True)
class NoisePlan:
    """Noise scale per released value, in natural units (Laplace b, or Gaussian σ).

    Derivation (one record added or removed; values clipped into [lo, hi]; ``g`` = groups a record can
    sit in at once: "all" plus at most one partition group, so 2):

    * count of a group: sensitivity 1 per group → L1 = g, L2 = √g.
    * centred sum Σ(x − c), c the bounds' midpoint: (hi − lo)/2 per feature.
    * Σ(x − x̄)²: at most (hi − lo)² per feature (n/(n+1)·(x − x̄)² with x, x̄ in the bounds).
    * histogram: one bin per feature moves by 1.

    Per feature the value is divided by that unit, so each family is one query over F (counts: 1)
    unit-sensitivity coordinates: L1 = g·F, L2 = √(g·F). Laplace b = L1/ε_family; Gaussian σ =
    z_family·L2 with z_family = z/√share (`output_dp`: the four together are one Gaussian release at
    the z the ledger charges for (ε, δ)); then multiplied back by each feature's unit.
    """

    mechanism: str
    epsilon: float
    delta: float
    split: dict[str, float]
    group_factor: int
    count: float
    histogram: float
    sum: np.ndarray  # (F,)
    m2: np.ndarray  # (F,)

    def as_dict(self, features: Sequence[str]) -> dict:
        return {
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_parameter": "laplace scale b" if self.mechanism == "laplace" else "gaussian sigma",
            "budget_split": dict(self.split),
            "records_in_groups": self.group_factor,
            "noise_scale": {
                "count": self.count,
                "histogram": self.histogram,
                "sum": dict(zip(features, self.sum.tolist(), strict=True)),
                "m2": dict(zip(features, self.m2.tolist(), strict=True)),
            },
            "neighbouring": "add or remove one patient record",
            "composition": (
                "basic: ε adds up over the four families"
                if self.mechanism == "laplace"
                else "RDP: the four families are one Gaussian release at the ledger's noise multiplier"
            ),
            "clipping": "values clamped into the public bounds before summing",
            "rows": "complete cases only (rows with a missing feature are left out)",
        }


def noise_plan(spec: StatsSpec, dp: DPConfig) -> NoisePlan:
    """Calibrate every family's noise to its share of ε (and δ); see :class:`NoisePlan`."""
    g = 2 if spec.n_groups > 1 else 1
    f = spec.n_features
    half_range = (spec.hi - spec.lo) / 2
    range_sq = (spec.hi - spec.lo) ** 2

    multipliers = (
        output_dp.family_multipliers(output_dp.noise_multiplier(dp.epsilon, dp.delta), dp.split)
        if dp.mechanism == "gaussian"
        else {}
    )

    def unit_noise(k: int, family: str) -> float:
        if dp.mechanism == "laplace":
            return g * k / (dp.epsilon * dp.split[family])
        return multipliers[family] * math.sqrt(g * k)

    return NoisePlan(
        mechanism=dp.mechanism,
        epsilon=float(dp.epsilon),
        delta=float(dp.delta),
        split=dict(dp.split),
        group_factor=g,
        count=unit_noise(1, "count"),
        histogram=unit_noise(f, "histogram"),
        sum=half_range * unit_noise(f, "sum"),
        m2=range_sq * unit_noise(f, "m2"),
    )


def gaussian_noise_multiplier(spec: StatsSpec, dp: DPConfig) -> float:
    """The Gaussian release as the one spend the privacy ledger's RDP accountant charges: (z, 1, 1).

    Each family k adds N(0, (z_k·Δ₂)²) with z_k = z/√share_k (`output_dp.family_multipliers`);
    Gaussian mechanisms without subsampling compose in RDP exactly as one with 1/z² = Σ_k 1/z_k², so
    the ledger charges exactly the ε asked for.
    """
    if dp.mechanism != "gaussian":
        raise ValueError("only the Gaussian mechanism has a noise multiplier")
    return output_dp.noise_multiplier(dp.epsilon, dp.delta)


def laplace_noise(scale: float | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Laplace(0, scale) noise from OpenDP's sampler, one measurement per distinct scale.

    Why not ``rng.laplace``: a floating-point Laplace (−b·log U) reaches only some doubles near each
    value, and which ones betray the value it was added to (Mironov, "On significance of the least
    significant bits for differential privacy", CCS 2012). OpenDP samples exactly on a 2^k grid with
    its own CSPRNG, so no job seed or caller generator is involved (issue 23, item 8).
    """
    import opendp.prelude as dp

    dp.enable_features("contrib")
    scales = np.broadcast_to(np.asarray(scale, dtype=np.float64), shape)
    out = np.empty(shape, dtype=np.float64)
    for b in np.unique(scales):
        where = scales == b
        if not b > 0:
            out[where] = 0.0
            continue
        space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)
        measure = dp.m.make_laplace(*space, scale=float(b))
        out[where] = measure([0.0] * int(where.sum()))
    return out


def _draw(rng: np.random.Generator, mechanism: str, scale: float | np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if mechanism == "laplace":
        return laplace_noise(scale, shape)
    return rng.normal(0.0, 1.0, size=shape) * scale


def add_noise(
    sums: Sums, m2: np.ndarray, spec: StatsSpec, plan: NoisePlan, rng: np.random.Generator
) -> tuple[Sums, np.ndarray]:
    """Noisy copies of the pooled aggregates (post-processed: counts rounded and ≥ 0, Σ(x−x̄)² ≥ 0).

    Counts per feature are replaced by the group's noisy row count: under DP only complete rows are
    summed, so one noisy count serves every feature (one query instead of F).
    """
    gshape, fshape = (spec.n_groups,), (spec.n_groups, spec.n_features)
    rows = np.maximum(np.rint(sums.rows + _draw(rng, plan.mechanism, plan.count, gshape)), 0).astype(np.int64)
    mid = (spec.lo + spec.hi) / 2
    centred = sums.total - sums.count * mid + _draw(rng, plan.mechanism, plan.sum, fshape)
    noisy_m2 = np.maximum(m2 + _draw(rng, plan.mechanism, plan.m2, fshape), 0.0)
    hist = sums.hist + _draw(rng, plan.mechanism, plan.histogram, sums.hist.shape)
    hist = np.maximum(np.rint(hist), 0).astype(np.int64)
    count = np.repeat(rows[:, None], spec.n_features, axis=1)
    total = centred + count * mid
    return Sums(rows=rows, count=count, total=total, hist=hist), noisy_m2


# --- small-cell suppression -------------------------------------------------------------------------------
@dataclass
class Suppression:
    """What is withheld from the release, with reasons that name the rule, never the hidden value."""

    min_cell: int
    groups: dict[str, str] = field(default_factory=dict)
    features: dict[str, dict[str, str]] = field(default_factory=dict)
    histograms: dict[str, dict[str, str]] = field(default_factory=dict)
    cells: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    #: group → proportion column → withheld levels (see :func:`suppress_extras`)
    levels: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    #: group → why its incidence rate is withheld
    rates: dict[str, str] = field(default_factory=dict)
    #: whether the job asked for proportions or a rate (their keys appear only then)
    extras: bool = False

    def as_dict(self, max_bins_percent: float | None) -> dict:
        out = self._as_dict(max_bins_percent)
        if self.extras:
            shut = {g: {c: list(v) for c, v in cols.items() if v} for g, cols in self.levels.items()}
            out["proportions_withheld"] = {g: v for g, v in shut.items() if v}
            out["proportion_cells_withheld_total"] = sum(len(v) for cols in self.levels.values() for v in cols.values())
            out["rates_withheld"] = dict(self.rates)
            out["rules"] += [
                f"a proportion's level with fewer than {self.min_cell} records is withheld (count, proportion, CI)",
                "complementary: each group's levels of a column (their total is the proportions' denominator) and, "
                f"while '{ALL}' is released, each level across groups hide none or at least two of their cells",
                f"an incidence rate with fewer than {self.min_cell} events or patients is withheld, and across groups "
                f"(while '{ALL}' is released) none or at least two are",
            ]
        return out

    def _as_dict(self, max_bins_percent: float | None) -> dict:
        return {
            "min_cell": self.min_cell,
            "max_bins_percent": max_bins_percent,
            "groups_withheld": dict(self.groups),
            "features_withheld": {g: dict(v) for g, v in self.features.items() if v},
            "histograms_withheld": {g: dict(v) for g, v in self.histograms.items() if v},
            "cells_withheld": {g: {f: list(b) for f, b in v.items() if b} for g, v in self.cells.items() if v},
            "cells_withheld_total": sum(len(b) for v in self.cells.values() for b in v.values()),
            "rules": [
                f"a group with fewer than {self.min_cell} rows is withheld whole",
                f"a group's feature with fewer than {self.min_cell} values is withheld (FLARE MinCountCleanser)",
                "a histogram with bins >= max_bins_percent of its values is withheld (FLARE HistogramBinsCleanser)",
                f"a histogram bin with fewer than {self.min_cell} records is withheld",
                f"complementary: when a partition group is withheld, '{ALL}' is too (else all − others reveals it)",
                f"rows in no declared group are one more partition group, '{RESIDUAL}': never published, "
                "withheld when small (without output DP)",
                "complementary: every published sum (a group's histogram; a bin across groups while "
                f"'{ALL}' is released) hides none or at least two of its cells (else subtraction reveals it)",
            ],
        }


def _feature_gate(
    spec: StatsSpec,
    released: list[str],
    counts: Mapping[str, np.ndarray],
    min_cell: int,
    max_bins_percent: float | None,
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """Which (group, feature) pairs FLARE's own statistics cleansers keep; (features, histograms) per group.

    The rules of `nvflare.app_common.statistics` `MinCountCleanser` (a feature needs ``min_count``
    values) and `HistogramBinsCleanser` (a histogram needs fewer bins than ``round(values ·
    max_bins_percent / 100)``), applied to the pooled counts at the releasing site (FLARE applies them
    per site, on plaintext). Restated here so this module stays numpy only; a unit test holds them
    equal to FLARE's classes.
    """
    features = {g: {f for f, c in zip(spec.features, counts[g], strict=True) if int(c) >= min_cell} for g in released}
    hists = {g: set(features[g]) for g in released}
    if max_bins_percent is not None:
        if not 0 <= max_bins_percent <= 100:
            raise ValueError(f"max_bins_percent {max_bins_percent} is not within (0, 100) ")
        for g in released:
            limits = {f: round(int(c) * max_bins_percent / 100) for f, c in zip(spec.features, counts[g], strict=True)}
            hists[g] = {f for f in features[g] if spec.bins < limits[f]}
    return features, hists


def _cell_pattern(hists: Mapping[str, np.ndarray], min_cell: int, linked: bool) -> dict[str, set[int]]:
    """Bins to withhold from one feature's histograms across the released groups.

    Primary: every bin below ``min_cell``. Complementary ("at least two per line", the usual
    statistical-disclosure heuristic): each *line*, a set of cells whose sum is published, must hide
    none or at least two of its cells, else the hidden one is that sum minus the others. The lines
    are each group's histogram (its count is released) and, when ``linked`` ("all" is released
    beside the whole partition), each bin across groups: all[b] = Σ_g g[b]. A line with one hidden
    cell hides its smallest other cell too, until no line has exactly one.
    """
    groups = list(hists)
    cells = {g: np.asarray(h) for g, h in hists.items()}
    bins = len(next(iter(cells.values())))
    hidden = {g: set(np.flatnonzero(cells[g] < min_cell).tolist()) for g in groups}
    lines: list[list[tuple[str, int]]] = [[(g, b) for b in range(bins)] for g in groups]
    if linked:
        lines += [[(g, b) for g in groups] for b in range(bins)]
    changed = True
    while changed:
        changed = False
        for line in lines:
            shut = [c for c in line if c[1] in hidden[c[0]]]
            if len(shut) == 1 and len(line) > 1:
                g, b = min((c for c in line if c not in shut), key=lambda c: (int(cells[c[0]][c[1]]), c[1]))
                hidden[g].add(b)
                changed = True
    return hidden


def residual_cells(
    spec: StatsSpec, rows: np.ndarray, counts: np.ndarray, hist: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Rows, value counts (F,) and histograms (F, bins) of the residual: ``all`` minus the declared groups.

    Exact for exact counts because declared groups are disjoint (one value of the group column each);
    a negative cell means they overlap, and then ``all`` − groups would not be the residual: refused.
    """
    rows, counts, hist = np.asarray(rows), np.asarray(counts), np.asarray(hist)
    r_rows = int(rows[0] - rows[1:].sum())
    r_counts = counts[0] - counts[1:].sum(axis=0)
    r_hist = hist[0] - hist[1:].sum(axis=0)
    if r_rows < 0 or (r_counts < 0).any() or (r_hist < 0).any():
        raise ValueError("the declared groups overlap (a row is in two of them): give each group its own value")
    return r_rows, r_counts, r_hist


def suppress(
    spec: StatsSpec,
    rows: np.ndarray,
    counts: np.ndarray,
    hist: np.ndarray,
    min_cell: int,
    max_bins_percent: float | None = 10.0,
    residual: bool = True,
) -> Suppression:
    """Decide what to withhold from pooled (possibly noisy) counts; nothing about values is needed.

    Applied where the result is decrypted, before anything leaves the key holders. Complementary
    rules stop the released totals from giving a withheld value back by subtraction. With
    ``residual`` (exact counts), rows in no declared group form one more partition group,
    :data:`RESIDUAL`: never published, but withheld when small and protected like any other (so ``all``
    goes when it would reveal it). An empty residual reveals no record and is left out. Under output
    DP (noisy counts, ``residual=False``) the noise, calibrated for a record in ``all`` and at most one
    other group, already covers ``all`` − groups.
    """
    if min_cell < 1:
        raise ValueError(f"min_cell must be at least 1, got {min_cell}")
    out = Suppression(min_cell=int(min_cell))
    names = list(spec.groups)
    rows, counts, hist = np.asarray(rows), np.asarray(counts), np.asarray(hist)
    partition = [g for g in names if g != ALL]
    if residual and partition:
        r_rows, r_counts, r_hist = residual_cells(spec, rows, counts, hist)
        if r_rows > 0:
            names.append(RESIDUAL)
            partition.append(RESIDUAL)
            rows = np.append(rows, r_rows)
            counts = np.vstack([counts, r_counts[None, :]])
            hist = np.concatenate([hist, r_hist[None]], axis=0)
    gi = {g: i for i, g in enumerate(names)}
    for g in names:
        if rows[gi[g]] < min_cell:
            out.groups[g] = f"fewer than {min_cell} rows"
    withheld_parts = [g for g in partition if g in out.groups]
    if withheld_parts and len(partition) > 1 and ALL not in out.groups:
        out.groups[ALL] = f"complementary: '{ALL}' minus the released groups would reveal {', '.join(withheld_parts)}"
    released = [g for g in names if g not in out.groups]

    counts_of = {g: counts[gi[g]] for g in released}
    kept, hist_kept = _feature_gate(spec, released, counts_of, min_cell, max_bins_percent)
    for g in released:
        out.features[g] = {f: f"fewer than {min_cell} values" for f in spec.features if f not in kept[g]}
    if ALL in released:  # a feature withheld in a partition group is withheld in "all" as well
        for g in released:
            for f in list(out.features[g]):
                if g != ALL and f not in out.features[ALL]:
                    out.features[ALL][f] = f"complementary: withheld in group '{g}'"
                    kept[ALL].discard(f)
    for g in released:
        out.histograms[g] = {
            f: f"{spec.bins} bins is not below {max_bins_percent}% of its values"
            for f in spec.features
            if f in kept[g] and f not in hist_kept[g]
        }
        out.cells[g] = {}
    if ALL in released:  # likewise a partition group's withheld histogram withholds the total's
        for f in spec.features:
            lost = [g for g in released if g != ALL and f in kept[g] and f not in hist_kept[g]]
            if lost and f in kept[ALL] and f in hist_kept[ALL]:
                out.histograms[ALL][f] = f"complementary: withheld in group '{lost[0]}'"
                hist_kept[ALL].discard(f)

    for j, f in enumerate(spec.features):
        shown = [g for g in released if f in kept[g] and f in hist_kept[g]]
        if ALL not in shown and RESIDUAL in shown:  # without "all" the residual cannot be derived
            shown.remove(RESIDUAL)
        if not shown:
            continue
        linked = ALL in shown and len(partition) > 1 and all(g in shown for g in partition)
        for g, bins in _cell_pattern({g: hist[gi[g], j] for g in shown}, min_cell, linked).items():
            out.cells[g][f] = sorted(bins)
    for part in (out.features, out.histograms, out.cells):  # the residual is protected, never published
        part.pop(RESIDUAL, None)
    return out


def _released_lines(
    spec: StatsSpec, sup: Suppression, cells: np.ndarray, residual: bool, rows: np.ndarray
) -> tuple[dict[str, np.ndarray], bool]:
    """The cells (G, K) of the released groups (plus the unpublished residual, when it has rows and
    ``all`` is shown, as in :func:`suppress`) and whether ``all`` and the whole partition are shown
    (then each cell across groups is a line too)."""
    rows = np.asarray(rows)
    cells = np.asarray(cells)
    partition = [g for g in spec.groups if g != ALL]
    by_group = {g: cells[i] for i, g in enumerate(spec.groups)}
    if residual and partition:
        rest = cells[0] - cells[1:].sum(axis=0)
        if (rest < 0).any():
            raise ValueError("the declared groups overlap (a row is in two of them): give each group its own value")
        by_group[RESIDUAL] = rest
    shown = {g: by_group[g] for g in spec.groups if g not in sup.groups}
    has_rows = len(rows) > 1 and int(rows[0] - rows[1:].sum()) > 0
    if ALL in shown and RESIDUAL in by_group and RESIDUAL not in sup.groups and has_rows:
        shown[RESIDUAL] = by_group[RESIDUAL]
    parts = [g for g in shown if g != ALL]
    return shown, ALL in shown and len(parts) > 1


def suppress_extras(spec: StatsSpec, sums: Sums, sup: Suppression, min_cell: int, residual: bool = True) -> None:
    """Withhold small proportion levels and incidence rates, in place in ``sup`` (groups decided already).

    The same rule as histogram cells (:func:`_cell_pattern`): a level count below ``min_cell`` is
    withheld; a group's levels of one column are a line (their total is the proportions'
    denominator, derivable from any released count and proportion), and while ``all`` is released
    beside the whole partition each level across groups is one (all = Σ groups, the residual of
    rows in no declared group included, unpublished). A line hides none or at least two cells.
    A rate is one cell per group (its events; events ≤ patients), withheld below ``min_cell``,
    and across groups likewise none or at least two, so all − others gives no withheld events or
    person-time back.
    """
    sup.extras = spec.has_extras
    start = 0
    for c, levels in spec.proportions:
        counts = np.asarray(sums.levels)[:, start : start + len(levels)]
        start += len(levels)
        shown, linked = _released_lines(spec, sup, counts, residual, sums.rows)
        if not shown:
            continue
        for g, hidden in _cell_pattern(shown, min_cell, linked).items():
            if g != RESIDUAL:
                sup.levels.setdefault(g, {})[c] = [levels[b] for b in sorted(hidden)]
    if spec.rate is not None:
        rate = np.asarray(sums.rate)
        cell = np.minimum(rate[:, 0], rate[:, 1])[:, None]  # events, or patients if fewer
        shown, linked = _released_lines(spec, sup, cell, residual, sums.rows)
        small = {g for g, v in shown.items() if v[0] < min_cell}
        pattern = _cell_pattern(shown, min_cell, linked) if shown else {}
        for g, hidden in pattern.items():
            if hidden and g != RESIDUAL:
                sup.rates[g] = (
                    f"fewer than {min_cell} events or patients"
                    if g in small
                    else "complementary: all − the other groups would reveal a withheld rate"
                )


def clopper_pearson(count: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Clopper–Pearson) two-sided interval of a binomial proportion count/n, from beta quantiles
    (as statsmodels' ``proportion_confint(method="beta")``); [0, ·] at 0 and [·, 1] at n."""
    from scipy.stats import beta

    alpha = 1.0 - confidence
    low = 0.0 if count <= 0 else float(beta.ppf(alpha / 2, count, n - count + 1))
    high = 1.0 if count >= n else float(beta.isf(alpha / 2, count + 1, n - count))
    return low, high


def poisson_exact(events: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact (Garwood) two-sided interval of a Poisson count: χ²_{α/2}(2k)/2 and χ²_{1−α/2}(2k+2)/2."""
    from scipy.stats import chi2

    alpha = 1.0 - confidence
    low = 0.0 if events <= 0 else float(chi2.ppf(alpha / 2, 2 * events) / 2)
    return low, float(chi2.isf(alpha / 2, 2 * events + 2) / 2)


def release_extras(spec: StatsSpec, sums: Sums, sup: Suppression, gi: int, g: str) -> dict:
    """Group ``g``'s ``proportions`` and ``rate`` entries (null fields where withheld), rounded."""
    out: dict = {}
    if spec.proportions:
        props: dict[str, dict] = {}
        start = 0
        for c, levels in spec.proportions:
            counts = np.asarray(sums.levels)[gi, start : start + len(levels)]
            start += len(levels)
            n = int(counts.sum())
            hidden = set(sup.levels.get(g, {}).get(c, []))
            props[c] = {}
            for level, k in zip(levels, counts.tolist(), strict=True):
                if level in hidden or n <= 0:
                    props[c][level] = {"count": None, "proportion": None, "ci_low": None, "ci_high": None}
                    continue
                low, high = clopper_pearson(int(k), n)
                props[c][level] = {
                    "count": int(k),
                    "proportion": round_release(k / n),
                    "ci_low": round_release(low),
                    "ci_high": round_release(high),
                }
        out[PROPORTIONS_KEY] = props
    if spec.rate is not None:
        patients, events, person_time = np.asarray(sums.rate)[gi].tolist()
        entry: dict = dict.fromkeys(("n", "events", "person_time", "rate", "ci_low", "ci_high"))
        if g not in sup.rates and person_time > 0:
            k, per = int(events), spec.rate_per
            low, high = poisson_exact(k)
            entry = {
                "n": int(patients),
                "events": k,
                "person_time": round_release(person_time),
                "rate": round_release(k / person_time * per),
                "ci_low": round_release(low / person_time * per),
                "ci_high": round_release(high / person_time * per),
            }
        entry.update(per=spec.rate_per, unit=spec.rate_unit or None, event=spec.rate[0], time=spec.rate[1])
        out[RATE_KEY] = entry
    return out


# --- quantiles from the fine histogram ---------------------------------------------------------------------
#: released quantiles: summary key → probability
QUANTILES = {"q25": 0.25, "median": 0.5, "q75": 0.75}


def _ranks(n: int, q: float) -> tuple[int, int, float]:
    """np.quantile's default ("linear") method: the two order statistics it mixes and the weight of the upper."""
    h = (n - 1) * q
    lo = math.floor(h)
    return lo, min(lo + 1, n - 1), h - lo


def histogram_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float | None:
    """The q-quantile of the values behind a histogram, as np.quantile (default method) would give it.

    Each order statistic x₍k₎ that np.quantile mixes is placed in the bin that holds rank k, at the
    midpoint of its rank's share of the bin (values taken as evenly spread in the bin); the true one
    lies in the same bin, so the result is within one bin width of np.quantile for values inside the
    edges. None for an empty histogram.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    if counts.size + 1 != edges.size:
        raise ValueError(f"{counts.size} bins but {edges.size} edges")
    n = int(counts.sum())
    if n <= 0:
        return None
    cum = np.cumsum(counts)

    def order_statistic(k: int) -> float:
        b = int(np.searchsorted(cum, k, side="right"))  # first bin whose cumulative count exceeds k
        below = int(cum[b] - counts[b])
        return float(edges[b] + (k - below + 0.5) / counts[b] * (edges[b + 1] - edges[b]))

    lo, hi, t = _ranks(n, q)
    return (1.0 - t) * order_statistic(lo) + t * order_statistic(hi)


def snap_to_grid(value: float, edges: np.ndarray) -> float:
    """``value`` rounded to the nearest of the (equally spaced) ``edges``: adds at most half a bin."""
    edges = np.asarray(edges, dtype=np.float64).reshape(-1)
    width = (edges[-1] - edges[0]) / (edges.size - 1)
    i = int(np.clip(np.rint((value - edges[0]) / width), 0, edges.size - 1))
    return float(edges[i])


def quantile_cells(counts: np.ndarray, hidden: set[int] | Sequence[int], q: float) -> bool:
    """Whether the q-quantile's ranks fall in a released coarse cell for *every* split of the withheld cells.

    ``counts`` is one group's exact coarse histogram, ``hidden`` the cells withheld from it. What is
    public: the released cells and the withheld total S (the group's count minus the released
    cells). The values below a released cell j are its released cells below, R_j, plus the withheld
    ones below, h: h = 0 if no withheld cell is below j, h = S if none is above, else anywhere in
    [0, S]. Rank k lies in j for every such h when R_j + h_max ≤ k < R_j + h_min + c_j; then that it
    lies there follows from the release alone and the quantile adds no constraint on a withheld cell.
    True when both ranks np.quantile mixes are so placed. The test uses released numbers and the
    withheld positions only, so a withheld (null) quantile reveals nothing about a withheld cell either.
    """
    counts = np.asarray(counts, dtype=np.int64).reshape(-1)
    n = int(counts.sum())
    if n <= 0:
        return False
    shut = {int(b) for b in hidden}
    shown = np.where([b in shut for b in range(counts.size)], 0, counts)
    withheld = n - int(shown.sum())
    released_below = np.concatenate([[0], np.cumsum(shown)[:-1]])

    def located(k: int) -> bool:
        for j in range(counts.size):
            if j in shut:
                continue
            below, above = any(b < j for b in shut), any(b > j for b in shut)
            h_min = 0 if above or not below else withheld
            h_max = withheld if below else 0
            if released_below[j] + h_max <= k < released_below[j] + h_min + counts[j]:
                return True
        return False

    lo, hi, _ = _ranks(n, q)
    return located(lo) and located(hi)


def release_quantiles(
    sums: Sums, spec: StatsSpec, gi: int, j: int, hidden: set[int] | Sequence[int]
) -> dict[str, float | None]:
    """median, q25 and q75 of group ``gi``, feature ``j`` from the fine histogram, rounded to its grid;
    None where :func:`quantile_cells` says the quantile would tell more than the released cells."""
    out: dict[str, float | None] = dict.fromkeys(QUANTILES)
    if not spec.quantile_bins or sums.fine is None:
        return out
    fine_edges = spec.fine_edges[j]
    for name, q in QUANTILES.items():
        if not quantile_cells(sums.hist[gi, j], hidden, q):
            continue
        estimate = histogram_quantile(sums.fine[gi, j], fine_edges, q)
        if estimate is not None:
            out[name] = round_release(snap_to_grid(estimate, fine_edges))
    return out


# --- the release -------------------------------------------------------------------------------------------
def release(
    sums: Sums,
    m2: np.ndarray,
    spec: StatsSpec,
    min_cell: int = 10,
    dp: DPConfig | None = None,
    max_bins_percent: float | None = 10.0,
    rng: np.random.Generator | None = None,
) -> dict:
    """What may leave the key holders: {"statistics", "suppression", "dp", "precision"} (JSON-able).

    Refuses (ValueError) a pass-1 sum of fewer than MIN_CONTRIBUTORS sites. With ``dp``, noise is
    added first and suppression decided on the noisy counts, so the decision is post-processing of a
    DP output and costs no extra privacy. Every mean and std is rounded (:func:`round_release`).
    Quantiles (``median``, ``q25``, ``q75``; module doc) come from the exact fine histogram, rounded to
    its grid, only without ``dp`` and only where :func:`quantile_cells` allows; null otherwise.
    """
    check_contributors(sums.contributors, "pass-1 sum")
    if dp is not None and spec.has_extras:  # never release them un-noised under DP
        raise ValueError(EXTRAS_UNDER_DP)
    plan = None
    if dp is not None:
        plan = noise_plan(spec, dp)
        sums, m2 = add_noise(sums, m2, spec, plan, rng or np.random.default_rng())
    sup = suppress(spec, sums.rows, sums.count, sums.hist, min_cell, max_bins_percent, residual=dp is None)
    edges = spec.edges
    stats: dict[str, dict[str, dict]] = {}
    for gi, g in enumerate(spec.groups):
        if g in sup.groups:
            continue
        stats[g] = {}
        for j, f in enumerate(spec.features):
            if f in sup.features.get(g, {}):
                continue
            n = int(sums.count[gi, j])
            mean = float(sums.total[gi, j] / n) if n > 0 else None
            std = float(math.sqrt(m2[gi, j] / (n - 1))) if n > 1 else None
            if plan is not None and mean is not None:  # post-processing: keep noisy values plausible
                mean = float(np.clip(mean, spec.lo[j], spec.hi[j]))
                std = None if std is None else float(min(std, spec.hi[j] - spec.lo[j]))
            entry: dict = {"count": n, "mean": round_release(mean), "std": round_release(std)}
            quantiles: dict[str, float | None] = dict.fromkeys(QUANTILES)
            if f in sup.histograms.get(g, {}):
                entry["histogram"] = None
            else:
                hidden = set(sup.cells.get(g, {}).get(f, []))
                entry["histogram"] = {
                    "bin_edges": edges[j].tolist(),
                    "counts": [None if b in hidden else int(sums.hist[gi, j, b]) for b in range(spec.bins)],
                }
                if plan is None:  # under DP the fine histogram is neither noised nor charged: no quantiles
                    quantiles = release_quantiles(sums, spec, gi, j, hidden)
            entry.update(quantiles)
            stats[g][f] = entry
    if spec.has_extras:
        suppress_extras(spec, sums, sup, min_cell, residual=dp is None)
        for gi, g in enumerate(spec.groups):
            if g in stats:
                stats[g].update(release_extras(spec, sums, sup, gi, g))
    precision_extras = (
        {"proportions_rates": "counts exact; proportions, rates, person-time and CIs to 7 significant digits"}
        if spec.has_extras
        else {}
    )
    return {
        "statistics": stats,
        "suppression": sup.as_dict(max_bins_percent),
        "dp": plan.as_dict(spec.features) if plan is not None else None,
        "precision": {
            "counts": "exact integers",
            "mean_std_significant_digits": SIGNIFICANT_DIGITS,
            "why": "decrypted CKKS values at full precision let the ciphertexts' holder recover the key",
            "quantiles": _quantile_note(spec, dp is not None),
            **precision_extras,
        },
    }


def _quantile_note(spec: StatsSpec, dp: bool) -> str:
    if not spec.quantile_bins:
        return "not computed (no fine histogram in this job's layout)"
    if dp:
        return "withheld under output DP (the fine histogram is not noised)"
    return (
        f"from a {spec.quantile_bins}-bin fine histogram over the public bounds (never released), order statistics "
        "interpolated within their bin, rounded to the nearest fine-bin edge: within 1.5 fine bins of np.quantile; "
        "null where the rank falls in a cell whose cumulative place the released histogram does not give"
    )


def round_release(value: float | None, digits: int = SIGNIFICANT_DIGITS) -> float | None:
    """``value`` rounded to ``digits`` significant digits (the nearest double to that decimal).

    The grid is relative (the step is 10^(e − digits + 1) for a value of magnitude 10^e), so the
    relative error stays ≤ 5·10^−digits whatever the unit, and the CKKS error (≤ 1e-8 relative
    here) falls below it.
    """
    if value is None or not math.isfinite(value):
        return value
    return float(f"{value:.{digits - 1}e}")


def pooled_reference(x: np.ndarray, masks: Mapping[str, np.ndarray], spec: StatsSpec) -> dict[str, dict[str, dict]]:
    """Count, mean, std (ddof=1) and np.quantile's q25/median/q75 computed centrally: the plaintext truth
    the federated run must match."""
    out: dict[str, dict[str, dict]] = {}
    for g in spec.groups:
        rows = np.asarray(x, dtype=np.float64)[np.asarray(masks[g], dtype=bool)]
        out[g] = {}
        for j, f in enumerate(spec.features):
            col = rows[:, j][~np.isnan(rows[:, j])]
            out[g][f] = {
                "count": int(col.size),
                "mean": float(col.mean()) if col.size else None,
                "std": float(col.std(ddof=1)) if col.size > 1 else None,
                **{k: float(np.quantile(col, q)) if col.size else None for k, q in QUANTILES.items()},
            }
    return out
