"""What every federated statistic shares: site tables to arrays, vectors of sums, and the Newton loop.

Every analytics method (`km`, `cox`, `glm`) is written the way it runs under CKKS: a site turns its
own rows into one flat float vector of *sums* (the only thing it encrypts), the server adds those
vectors slot by slot and sees nothing else, and a pure combine step turns the summed vector into
the result or the next iterate. Sums are the one operation CKKS gives the server, so anything that
is not a sum over patients (a median, a maximum, a sorted order) must be rebuilt from sums here.

`sum_site_vectors` is the plain-numpy stand-in for the encrypted sum in tests and `fit_federated`
helpers; it checks what the encrypted aggregator checks (same length at every site) so a layout
mismatch fails in the unit tests, not in a ciphertext. A "table" is any mapping from column name
to a 1-D array (a dict of arrays, a pandas DataFrame, a SQLite row set turned into columns), so
these modules import neither pandas nor a database driver.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from clinfed.errors import SiteDataError

Table = Mapping[str, Any]

Z95 = float(stats.norm.ppf(0.975))


def pack_sym(m: np.ndarray) -> np.ndarray:
    """The upper triangle (row-major, diagonal included) of a symmetric p×p matrix: p(p+1)/2 values."""
    p = m.shape[-1]
    iu = np.triu_indices(p)
    return m[..., iu[0], iu[1]]


def unpack_sym(v: np.ndarray, p: int) -> np.ndarray:
    """Inverse of `pack_sym` (works on a leading batch axis too)."""
    iu = np.triu_indices(p)
    out = np.zeros((*v.shape[:-1], p, p))
    out[..., iu[0], iu[1]] = v
    out[..., iu[1], iu[0]] = v
    return out


def n_sym(p: int) -> int:
    """Values in a packed symmetric p×p matrix."""
    return p * (p + 1) // 2


def sum_site_vectors(vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """Slot-wise sum of the sites' vectors: what the encrypted aggregator computes, in the clear.

    Refuses vectors of different lengths (naming the site) because a slot that means different
    things at different sites would add silently under encryption.
    """
    if not vectors:
        raise ValueError("no site vectors to sum")
    items = list(vectors.items())
    first_site, first = items[0]
    total = np.array(first, dtype=float).ravel()
    for site, vec in items[1:]:
        v = np.asarray(vec, dtype=float).ravel()
        if v.shape != total.shape:
            raise ValueError(f"{site}: vector has {v.size} values, {first_site} sent {total.size}")
        total = total + v
    return total


def columns(table: Table, names: Sequence[str], site: str = "site") -> np.ndarray:
    """The named columns as an n×len(names) float array; a one-line error naming the site otherwise."""
    cols = []
    for name in names:
        try:
            raw = table[name]
        except (KeyError, IndexError):
            raise SiteDataError(f"{site}: no column {name!r}") from None
        arr = np.asarray(raw)
        if arr.dtype.kind not in "biuf":
            try:
                arr = arr.astype(float)
            except (TypeError, ValueError):
                raise SiteDataError(f"{site}: column {name!r} is not numeric (encode it first)") from None
        cols.append(arr.astype(float).ravel())
    if not cols:
        return np.zeros((0, 0))
    n = {c.size for c in cols}
    if len(n) != 1:
        raise SiteDataError(f"{site}: columns {list(names)} differ in length")
    return np.column_stack(cols)


def complete_cases(table: Table, names: Sequence[str], site: str = "site") -> np.ndarray:
    """`columns` without the rows that miss any of them (complete-case analysis, as R and statsmodels do)."""
    arr = columns(table, names, site)
    return arr[~np.isnan(arr).any(axis=1)]


def moments_site_local(x: np.ndarray) -> np.ndarray:
    """[n, Σx (p), Σxx' (p(p+1)/2)]: the one pass that gives a shared centre and covariance.

    Cox uses the pooled mean as the common centre of exp((x−c)β) so sums stay in floating-point
    range at every site; the covariance sizes the concordance histogram's score range.
    """
    x = np.asarray(x, dtype=float)
    return np.concatenate([[x.shape[0]], x.sum(axis=0), pack_sym(x.T @ x)])


def moments_combine(summed: np.ndarray, p: int) -> tuple[int, np.ndarray, np.ndarray]:
    """(n, mean, covariance (divisor n)) from summed `moments_site_local` vectors."""
    n = round(float(summed[0]))
    if n <= 0:
        raise ValueError("no rows at any site")
    mean = summed[1 : 1 + p] / n
    cov = unpack_sym(summed[1 + p :], p) / n - np.outer(mean, mean)
    return n, mean, cov


def split_rows(n_rows: int, n_sites: int, seed: int = 0) -> list[np.ndarray]:
    """Row indices of `n_sites` near-equal random shards (tests and demos split one real table)."""
    if n_sites < 1:
        raise ValueError("need at least one site")
    order = np.random.default_rng(seed).permutation(n_rows)
    return [np.sort(part) for part in np.array_split(order, n_sites)]


def take_rows(table: Table, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The rows `idx` of every column of `table`, as a dict of arrays."""
    return {str(name): np.asarray(table[name])[idx] for name in table}


def split_table(table: Table, n_sites: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """One real table dealt at random to sites `site-1` … `site-N`."""
    n = len(np.asarray(table[next(iter(table))]))
    return {f"site-{i + 1}": take_rows(table, idx) for i, idx in enumerate(split_rows(n, n_sites, seed))}


def wald_table(
    names: Sequence[str], coef: np.ndarray, se: np.ndarray, *, exp: bool = False, alpha: float = 0.05
) -> dict[str, dict[str, float]]:
    """Per-coefficient Wald statistics with normal z (as lifelines' and statsmodels' GLM summaries).

    With `exp` (Cox) the row carries `hr` and its CI on the hazard-ratio scale, exp(coef ± z·se);
    otherwise `z` and the CI of coef itself.
    """
    zq = float(stats.norm.ppf(1 - alpha / 2))
    out: dict[str, dict[str, float]] = {}
    for name, b, s in zip(names, coef, se, strict=True):
        z = float(b / s) if s > 0 else float("nan")
        p = float(2 * stats.norm.sf(abs(z)))
        lo, hi = float(b - zq * s), float(b + zq * s)
        if exp:
            out[name] = {
                "coef": float(b),
                "se": float(s),
                "hr": float(np.exp(b)),
                "ci_low": float(np.exp(lo)),
                "ci_high": float(np.exp(hi)),
                "p": p,
            }
        else:
            out[name] = {"coef": float(b), "se": float(s), "z": z, "p": p, "ci_low": lo, "ci_high": hi}
    return out


@dataclass
class NewtonRaphson:
    """Maximise a log-likelihood one evaluation (one round of site sums) at a time.

    The state lives at the server (or whoever combines): `beta` is the point the sites evaluate
    next. `update(ll, grad, info)` takes the summed log-likelihood, gradient and information
    (minus the Hessian) at `beta` and either moves `beta` (a Newton step, or half the previous step
    when the log-likelihood fell, as lifelines and R's coxph do) or declares convergence once a
    Newton step is under `tol` standard errors, leaving `beta` at the optimum (that last step
    taken) and `info` for standard errors. `iterations` counts evaluations,
    i.e. rounds in which every site sent one vector.
    """

    beta: np.ndarray
    tol: float = 1e-5
    max_iter: int = 25
    iterations: int = 0
    converged: bool = False
    loglik: float = float("nan")
    info: np.ndarray | None = None
    _prev: tuple[np.ndarray, float, np.ndarray] | None = field(default=None, repr=False)

    def update(self, ll: float, grad: np.ndarray, info: np.ndarray) -> bool:
        """Record the evaluation at `beta`; True when no further round is needed."""
        self.iterations += 1
        if not np.isfinite(ll):
            if self._prev is None:
                raise ValueError("log-likelihood is not finite at the starting point")
            return self._halve()
        if self._prev is not None and ll < self._prev[1] - 1e-10 * (1.0 + abs(self._prev[1])):
            return self._halve()
        self.loglik, self.info = float(ll), info
        try:
            step = np.linalg.solve(info, grad)
        except np.linalg.LinAlgError:
            raise ValueError("information matrix is singular (collinear covariates or no events)") from None
        se = np.sqrt(np.abs(np.diag(np.linalg.inv(info))))
        if np.max(np.abs(step) / np.where(se > 0, se, 1.0)) < self.tol:
            # Measured in standard errors, so the test does not depend on covariate units (a
            # 1e-6 move of a coefficient on a 0–2000 scale is not small). Newton converges
            # quadratically: after this last step β is exact to ~step², and `info` (at β, one
            # step away) gives SEs exact to ~step.
            self.beta = self.beta + step
            self.converged = True
            return True
        if self.iterations >= self.max_iter:
            return True
        self._prev = (self.beta.copy(), float(ll), step)
        self.beta = self.beta + step
        return False

    def _halve(self) -> bool:
        """Back off to half the last step; out of rounds, stay at the last accepted point instead."""
        assert self._prev is not None
        beta0, ll0, step = self._prev
        if self.iterations >= self.max_iter:
            self.beta = beta0
            return True
        self._prev = (beta0, ll0, step / 2)
        self.beta = beta0 + step / 2
        return False
