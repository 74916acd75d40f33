"""The analytics methods as strategies for the one encrypted-sums job (`sums_fl`).

Why strategies: every method (Kaplan–Meier, Cox, GLM, cohort statistics) runs the same protocol: each site turns its
complete cases into a flat vector of sums at the current iterate, the server adds the encrypted
vectors, and the key-holding release site turns the sum into the next iterate or the result. So
`sums_fl` owns the protocol (tasks, encryption, contributor counts, audit, summary.json) once, and a
method only says which variables it reads, what its site vector is in each *phase*, and how a summed
vector steps the fit. The math lives in `km`, `cox`, `glm` and `stats` (numpy only); these classes are
thin. `cohort_stats` (`cohort_method.CohortStats`) has its own module: it brings its own rows
(`cohort_data`) and its own disclosure control (release log, output DP over four families).

A method object is built from a JSON dict (`registry.make_method`, which lists every method), the
same dict at the server and at every site (its digest is the job's settings, checked by each site).
The release site keeps the fit's state (Newton's previous point, the IRLS iterate) in its own
method object between rounds; the server only carries ciphertexts of the iterate.

Phases: ``km``: "counts" (one round). ``cox`` stratified: "newton" rounds, then "concordance";
pooled: "moments" (the shared centre), "newton", "concordance". ``glm``: "irls" rounds.
``cohort``: "sums", then "deviations".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinfed.analytics import cox, glm, km
from clinfed.analytics.federated import NewtonRaphson, complete_cases, moments_combine, moments_site_local, n_sym
from clinfed.analytics.output_dp import dp_config  # noqa: F401  (the job folders' import path)
from clinfed.errors import SiteDataError, SiteRefusal

#: The most Newton/IRLS evaluations a fit may take before it is released as not converged.
MAX_ITER = 25


def level_text(value: Any) -> str:
    """A group value as the text a level is named by: 1, 1.0 and "1" are all "1"."""
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, np.integer):
        return str(int(value))
    return str(value)


def _present(values: np.ndarray) -> np.ndarray:
    """Rows with a value (NaN in numbers, None in text are missing)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "f":
        return ~np.isnan(arr)
    if arr.dtype.kind == "O":
        return np.array([v is not None and not (isinstance(v, float) and np.isnan(v)) for v in arr], dtype=bool)
    return np.ones(arr.shape[0], dtype=bool)


#: Iterates sent to the sites are on a 2^-40 grid, which `sums_fl` carries through CKKS exactly.
FIXED_POINT_BITS = 40


def fixed_point(v: np.ndarray) -> np.ndarray:
    """`v` on the 2^-40 grid: the release site keeps exactly the point the sites evaluate at.

    Why: CKKS returns an iterate with ~1e-9 error, and Cox's log-likelihood is assembled at the
    release site as Σx_ev·β − Σ log φ(β'): evaluated at a β' the sites decrypted but scored with
    the release site's β, it is off by Σx_ev·(β' − β) (~1e-6 on gbsg2), enough for Newton's
    "log-likelihood fell" test to halve steps forever. On the grid both sides hold the same β.
    """
    scale = 2.0**FIXED_POINT_BITS
    return np.rint(np.asarray(v, dtype=np.float64) * scale) / scale


def _count_free(note: str, min_cell: int) -> str:
    """`km.enforce_min_cell`'s note without the counts it names (a tail's events, deferred censorings,
    a withheld group's size): those are the small cells the control keeps out of the release."""
    if note.startswith("withheld"):
        return f"withheld: too few patients to form bins of ≥ {min_cell}"
    note = re.sub(r"\d+ censorings deferred", "censorings under the minimum cell deferred", note)
    return re.sub(r": \d+ patients \(\d+ events\) released", ": its patients released", note)


@dataclass
class Step:
    """What the release site does after one summed vector: ask for another round, or release.

    `iterate` goes back to every site encrypted; `result` is the released block (summary.json's
    `km`, `cox` or `glm`) with `n` used and `suppressed` (what disclosure control did) for its
    provenance.
    """

    phase: str | None = None
    iterate: np.ndarray | None = None
    result: dict[str, Any] | None = None
    n: int = 0
    suppressed: Any = "none"
    #: more top-level fields of the release (cohort_stats: suppression, dp, precision), sent as they are
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SiteInfo:
    """Where a method runs at a site: what `Method.read` needs to find the site's rows and local files
    (policy, PSI result, release log) without knowing FLARE."""

    name: str
    root: Path
    policy: Any  # clinfed.fl.participant.SitePolicy
    run_id: str = ""
    job_label: str = ""
    num_sites: int = 3


class Method:
    """One analysis: variables, per-phase site vector and size, and the combine/step.

    Output DP (optional, ``config["dp"]``): a method that can bound what one patient changes in its
    summed vector declares that L2 bound as `dp_sensitivity`; the release site then adds Gaussian
    noise N(0, (z·Δ₂)²) to every decrypted sum before it steps (`noisy`), and every site charges
    (z, sample rate 1, `dp_releases` steps) to its own ledger first. A method without a bound
    (None) refuses a DP config at submission.
    """

    block = ""
    first_phase = ""
    max_rounds = 1
    #: L2 change of the summed vector when one patient is added or removed; None: no output DP.
    dp_sensitivity: float | None = None
    #: Noised sums per job (Gaussian mechanism invocations the ledger composes).
    dp_releases = 1
    #: How many CKKS limbs carry each summed value (`sums_fl.two_limbs`): 2 for sums that may pass the
    #: slot bound (Σ age², pair counts); 1 for a method that keeps its slots under it itself.
    wire_limbs = 2

    def __init__(self, config: Mapping[str, Any]):
        self.config = dict(config)

    def check_dp(self) -> None:
        """Refuse (ValueError, at submission) an output-DP config this method cannot honour."""
        dp = self.dp
        if dp is None:
            return
        if self.dp_sensitivity is None:
            raise ValueError(
                f"{self.config.get('method')} has no output DP: one patient's share of its sums has no public bound"
            )
        z = dp.get("noise_multiplier")
        if not isinstance(z, int | float) or not 0 < float(z) < 1e6:
            raise ValueError(f"output DP needs a positive noise multiplier, got {z!r}")

    def digest(self) -> str:
        """What every participant must agree on for the vectors to add slot by slot."""
        return hashlib.sha256(json.dumps(self.config, sort_keys=True).encode()).hexdigest()

    def variables(self) -> list[str]:
        raise NotImplementedError

    def read(self, site: SiteInfo) -> Any:
        """The site's table of `variables()`: by default from its database (policy ``database``, or its
        `<site>.sqlite` in a `clinfed data split` folder). A method with other sources overrides it."""
        from clinfed.data.source import site_table

        return site_table(site.policy, site.name, self.variables(), cohort=self.config.get("omop_cohort"))

    def load(self, table: Mapping[str, np.ndarray], site: str, min_cell: int) -> Any:
        """The site's complete cases as arrays; SiteDataError/SiteRefusal (one line) if it cannot take part."""
        raise NotImplementedError

    def vet(self, data: Any, phase: str, iterate: np.ndarray | None, sites: Sequence[str]) -> None:
        """A site's own check before its vector for `phase` leaves (SiteRefusal to refuse); none by default."""

    def release_grid(self, min_cell: int) -> dict[str, Any]:
        """The settings that place patients in released cells (the release log keeps one per method); none here."""
        return {}

    def vet_release(self, data: Any, result: dict[str, Any], sites: Sequence[str]) -> None:
        """The release site's own check of the block it is about to release (SiteRefusal to refuse)."""

    def summary_fields(self, release: Mapping[str, Any]) -> dict[str, Any]:
        """Top-level summary.json fields besides the block (cohort_stats: suppression, dp, precision)."""
        return {}

    def release_metrics(self, release: Mapping[str, Any]) -> dict[str, Any]:
        """More `final.metrics` of a release (cohort_stats: groups and cells withheld)."""
        return {}

    def size(self, phase: str) -> int:
        raise NotImplementedError

    def iterate_size(self, phase: str) -> int:
        return 0

    def site_local(self, data: Any, phase: str, iterate: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def step(self, summed: np.ndarray, phase: str, min_cell: int) -> Step:
        raise NotImplementedError

    # --- output DP --------------------------------------------------------------------------------
    @property
    def dp(self) -> dict | None:
        """The job's output-DP settings ({epsilon, delta, noise_multiplier}) or None."""
        return self.config.get("dp") or None

    def planned_spends(self) -> list[tuple[float, float, int]]:
        """What every site charges its ledger for this job: [(z, 1.0, releases)], or nothing without DP."""
        if self.dp is None:
            return []
        return [(float(self.dp["noise_multiplier"]), 1.0, int(self.dp_releases))]

    def planned_pure_epsilon(self) -> float:
        """The job's pure-ε (Laplace) releases, added by basic composition beside the RDP spends; 0 here."""
        return 0.0

    def noisy(self, summed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """`summed` plus the Gaussian mechanism's noise (post-processed by `clean_noisy`); as is without DP."""
        if self.dp is None:
            return summed
        assert self.dp_sensitivity is not None
        sd = float(self.dp["noise_multiplier"]) * self.dp_sensitivity
        return self.clean_noisy(summed + rng.normal(0.0, sd, summed.shape))

    def clean_noisy(self, noisy: np.ndarray) -> np.ndarray:
        """Post-processing of a noised sum (free under DP): counts back to non-negative integers."""
        return noisy


# --- Kaplan–Meier ---------------------------------------------------------------------------------
class KaplanMeier(Method):
    """Per-bin events and censorings per group, one round; min-cell merging at the release site.

    Config: time_bin, n_bins (the horizon every site bins to), group (column or None), levels.
    """

    block = "km"
    first_phase = "counts"
    dp_sensitivity = 1.0  # a patient is one event or one censoring, in one bin of one group

    def clean_noisy(self, noisy):
        return km.consistent_counts(noisy, 2 * len(self.levels))

    def release_grid(self, min_cell):
        c = self.config
        return {
            "time_bin": float(c["time_bin"]),
            "n_bins": int(c["n_bins"]),
            "group": c.get("group"),
            "levels": self.levels,
            "min_cell": int(min_cell),
        }

    @property
    def levels(self) -> list[str]:
        return list(self.config.get("levels") or [km.ALL]) if self.config.get("group") else [km.ALL]

    def variables(self) -> list[str]:
        group = self.config.get("group")
        return ["time", "event", *([group] if group else [])]

    def load(self, table, site, min_cell):
        keep = np.ones(len(table["time"]), dtype=bool)
        for name in self.variables():
            keep &= _present(table[name])
        data = complete_cases({k: np.asarray(table[k])[keep] for k in ("time", "event")}, ["time", "event"], site)
        g = None
        if self.config.get("group"):
            g = np.array([level_text(v) for v in np.asarray(table[self.config["group"]])[keep]], dtype=object)
        return data[:, 0], data[:, 1], g

    def size(self, phase):
        return 2 * len(self.levels) * int(self.config["n_bins"])

    def site_local(self, data, phase, iterate):
        t, e, g = data
        return km.km_site_local(
            t, e, g, levels=self.levels, time_bin=float(self.config["time_bin"]), n_bins=int(self.config["n_bins"])
        )

    def step(self, summed, phase, min_cell):
        result, notes = km.km_combine(
            summed,
            levels=self.levels,
            time_bin=float(self.config["time_bin"]),
            n_bins=int(self.config["n_bins"]),
            min_cell=min_cell,
        )
        return Step(
            result=result,
            n=round(float(np.sum(summed))),
            suppressed={level: _count_free(note, min_cell) for level, note in notes.items()},
        )


# --- Cox ------------------------------------------------------------------------------------------
class CoxPH(Method):
    """Newton–Raphson on summed Efron log-likelihood, gradient and information; then concordance.

    Config: covariates, strata ("site" or None), time_bin and n_bins (pooled only), max_iter, tol.
    """

    block = "cox"
    max_rounds = MAX_ITER + 2

    def __init__(self, config):
        super().__init__(config)
        self.p = len(self.config["covariates"])
        self.stratified = self.config.get("strata") == "site"
        self.first_phase = "newton" if self.stratified else "moments"
        self._opt = NewtonRaphson(
            np.zeros(self.p),
            tol=float(self.config.get("tol", 1e-5)),
            max_iter=int(self.config.get("max_iter", MAX_ITER)),
        )
        self._center = np.zeros(self.p)
        self._cov = np.eye(self.p)
        self._n = self._events = 0
        self.n_score_bins = int(self.config.get("n_score_bins", 256))

    def variables(self):
        return ["time", "event", *self.config["covariates"]]

    def release_grid(self, min_cell):
        if self.stratified:
            return {}
        return {
            "time_bin": float(self.config["time_bin"]),
            "n_bins": int(self.config["n_bins"]),
            "n_score_bins": self.n_score_bins,
        }

    def load(self, table, site, min_cell):
        data = complete_cases(table, self.variables(), site)
        if not (data[:, 1] > 0).any():
            raise SiteDataError(f"{site}: no events among its {data.shape[0]} complete cases")
        return data[:, 0], data[:, 1], data[:, 2:]

    def size(self, phase):
        if phase == "moments":
            return 1 + self.p + n_sym(self.p)
        if phase == "newton":
            if self.stratified:
                return 3 + self.p + n_sym(self.p)
            return int(self.config["n_bins"]) * (3 + 3 * self.p + 2 * n_sym(self.p)) + 1
        if self.stratified:
            return 3
        return int(self.config["n_bins"]) * 2 * self.n_score_bins

    def iterate_size(self, phase):
        if phase == "moments":
            return 0
        if self.stratified:
            return self.p
        return 2 * self.p + (1 if phase == "concordance" else 0)

    def site_local(self, data, phase, iterate):
        t, e, x = data
        if phase == "moments":
            return moments_site_local(x)
        beta = np.zeros(self.p) if iterate is None else iterate[: self.p]
        if self.stratified:
            if phase == "newton":
                return cox.cox_stratified_site_local(t, e, x, beta)
            return cox.concordance_site_local(t, e, x @ beta)
        center = iterate[self.p : 2 * self.p]
        tb, nb = float(self.config["time_bin"]), int(self.config["n_bins"])
        if phase == "newton":
            return cox.cox_pooled_site_local(t, e, x, beta, time_bin=tb, n_bins=nb, center=center)
        sd = float(iterate[2 * self.p])
        edges = np.linspace(-8 * sd, 8 * sd, self.n_score_bins + 1)
        return cox.concordance_hist_site_local(t, e, (x - center) @ beta, time_bin=tb, n_bins=nb, edges=edges)

    def _iterate(self, extra: Sequence[float] = ()) -> np.ndarray:
        self._opt.beta = fixed_point(self._opt.beta)
        if self.stratified:
            return self._opt.beta.copy()
        return np.concatenate([self._opt.beta, self._center, list(extra)])

    def step(self, summed, phase, min_cell):
        if phase == "moments":
            self._n, center, self._cov = moments_combine(summed, self.p)
            self._center = fixed_point(center)
            return Step(phase="newton", iterate=self._iterate())
        if phase == "newton":
            if self.stratified:
                ll, grad, info, self._n, self._events = cox.cox_stratified_combine(summed, self.p)
            else:
                ll, grad, info, self._n, self._events = cox.cox_pooled_combine(
                    summed, self._opt.beta, int(self.config["n_bins"])
                )
            if not self._opt.update(ll, grad, info):
                return Step(phase="newton", iterate=self._iterate())
            if self.stratified:
                return Step(phase="concordance", iterate=self._iterate())
            sd = float(np.sqrt(max(self._opt.beta @ self._cov @ self._opt.beta, 1e-300)))
            return Step(phase="concordance", iterate=self._iterate(fixed_point(np.array([sd]))))
        if self.stratified:
            counts = summed
        else:
            counts = cox.concordance_from_hist(summed, int(self.config["n_bins"]), self.n_score_bins)
        result = cox.cox_summary(
            list(self.config["covariates"]),
            self._opt,
            n=self._n,
            events=self._events,
            strata="site" if self.stratified else None,
            time_bin=None if self.stratified else float(self.config["time_bin"]),
            concordance=float((counts[0] + counts[1] / 2) / counts[2]),
        )
        return Step(result=result, n=self._n, suppressed="none")


# --- GLM ------------------------------------------------------------------------------------------
class GLM(Method):
    """IRLS on summed X'WX and X'Wz; DataSHIELD-style disclosure check at each site before it sends.

    Config: family, outcome, covariates, offset (column or None), max_iter, tol.
    """

    block = "glm"
    first_phase = "irls"
    max_rounds = MAX_ITER
    #: parameters per observation a site allows (its policy sets this before `load`; DataSHIELD's nfilter.glm)
    max_params_per_observation = glm.MAX_PARAM_FRACTION

    def __init__(self, config):
        super().__init__(config)
        self.names = [glm.INTERCEPT, *self.config["covariates"]]
        self.p = len(self.names)
        self._beta = np.zeros(self.p)
        self._iterations = 0
        self._data_start = self.config.get("start") == "data"

    def variables(self):
        offset = self.config.get("offset")
        return [self.config["outcome"], *self.config["covariates"], *([offset] if offset else [])]

    def load(self, table, site, min_cell):
        covs = list(self.config["covariates"])
        data = complete_cases(table, self.variables(), site)
        x = np.column_stack([np.ones(data.shape[0]), data[:, 1 : 1 + len(covs)]])
        y = data[:, 0]
        family = self.config["family"]
        if family == "binomial" and not np.isin(y, (0.0, 1.0)).all():
            raise SiteDataError(f"{site}: outcome {self.config['outcome']!r} is not coded 0/1")
        counts = glm.site_counts(y, x, self.names, self.config["outcome"], family)
        try:
            glm.disclosure_check({site: counts}, self.p, min_cell, self.max_params_per_observation)
        except ValueError:
            # The reason goes to the server and into summary.json: name the cause, never the count.
            cap = self.max_params_per_observation
            if self.p > cap * counts["n"]:
                raise SiteRefusal(f"{site}: {self.p} parameters exceed {cap:g} × this site's rows") from None
            small = next(
                f"{column} = {level}"
                for column, levels in counts["levels"].items()
                for level, rows in levels.items()
                if int(rows) < min_cell
            )
            raise SiteRefusal(f"{site}: {small} has fewer rows than the minimum cell {min_cell}") from None
        off = data[:, -1] if self.config.get("offset") else None
        if off is not None and self.config.get("offset_log"):  # `--offset log(COL)`: exposure, e.g. person-time
            if (off <= 0).any():
                raise SiteDataError(f"{site}: offset column {self.config['offset']!r} has values ≤ 0: no log")
            off = np.log(off)
        return x, y, off

    def size(self, phase):
        return n_sym(self.p) + self.p + 3

    def iterate_size(self, phase):
        return self.p

    def site_local(self, data, phase, iterate):
        x, y, off = data
        if iterate is None:  # round 0: β = 0, or with ``start: "data"`` a first step from the data (`glm.start_mean`)
            return glm.glm_site_local(x, y, None if self._data_start else np.zeros(self.p), self.config["family"], off)
        return glm.glm_site_local(x, y, iterate, self.config["family"], off)

    def step(self, summed, phase, min_cell):
        self._iterations += 1
        new_beta, xtwx, deviance, pearson, n = glm.glm_combine(summed, self.p)
        # The iterate travels encrypted (CKKS error ~1e-9), so the 1e-10 of the plain fit would never be met;
        # IRLS converges quadratically, so a step under 1e-7 leaves the estimate exact to the CKKS error.
        tol = float(self.config.get("tol", 1e-7))
        converged = bool(np.max(np.abs(new_beta - self._beta)) < tol * (1.0 + np.max(np.abs(self._beta))))
        converged &= not (self._data_start and self._iterations == 1)  # the start's sums are at no β: step on
        if converged or self._iterations >= int(self.config.get("max_iter", MAX_ITER)):
            result = glm.glm_summary(
                self.names,
                self._beta,
                xtwx,
                family=self.config["family"],
                deviance=deviance,
                pearson=pearson,
                n=n,
                iterations=self._iterations,
                converged=converged,
            )
            return Step(result=result, n=n, suppressed="none")
        self._beta = fixed_point(new_beta)
        return Step(phase="irls", iterate=self._beta.copy())
