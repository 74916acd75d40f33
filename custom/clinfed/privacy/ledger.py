"""A site's persistent privacy ledger: every DP release, across rounds, jobs and mechanisms, and the ε it implies.

Like Opacus' `RDPAccountant`, the only state is the history of spends; ε is recomputed from it on
demand, never cached or trusted from a file. The ledger lives in the site's own `local/` folder, so a
new job on the same site starts from what earlier jobs spent, and budget, δ and accountant come from
the site's policy, not from the job: a job cannot raise them, and neither can the file: the δ and
accountant it records are ignored (issue 23: a file edited to δ = 0.5 took ε below zero). Every stored
spend must be one `reserve` could have written, and match its audit record parameter by parameter;
ε is never negative.

**Composition rule** (one ledger for every mechanism, one ε per site):

* ``gaussian`` spends -- DP-SGD rounds (noise multiplier, Poisson sample rate, steps) and Gaussian
  output DP of statistics (noise multiplier = σ/Δ₂, sample rate 1.0, 1 step) -- form one RDP
  history, composed by Opacus' accountant (:func:`epsilon_of`) and converted to ε at the site's δ.
* ``laplace`` spends are pure ε-DP releases (given as ``epsilon=``) and add by basic composition.
* The site's total at δ is ``ε_RDP(gaussian history, δ) + Σ ε_laplace``: an (ε₁, δ) and an (ε₂, 0)
  guarantee compose to (ε₁ + ε₂, δ). :meth:`PrivacyLedger.epsilon` returns that total;
  :attr:`PrivacyLedger.history` is the Gaussian history alone, exactly what Opacus consumed, and
  :attr:`PrivacyLedger.pure_epsilons` the Laplace terms, so anyone can recompute the total.

**Concurrency and loss.** FLARE runs concurrent jobs in separate processes, so every operation
re-reads the file under an OS lock (``flock`` on the sidecar ``<ledger>.lock``; exclusive for
writes) and every write is atomic (temporary file, fsync, rename): no process's spend can erase
another's. A spend is *reserved before* the work it pays for (:meth:`PrivacyLedger.reserve`): if
training then fails the spend stays charged, which over-counts but never under-counts.

**Cross-check with the audit log.** Given the site's :class:`~clinfed.audit.AuditLog`, the ledger
writes each spend's ``epsilon_spent`` record inside its own lock (ledger and audit never disagree),
and on opening and on every reservation it refuses (:class:`LedgerMismatch`) when the audit log
records spends the ledger lacks: a deleted, truncated or restored-from-backup ledger is never
silently taken for a site that spent nothing.

File format (`local/privacy_ledger.json`)::

    {"site": "site-1", "delta": 1e-05, "accountant": "rdp",
     "spends": [{"job": "...", "round": 0, "noise_multiplier": 1.57, "sample_rate": 0.2, "steps": 5,
                 "epsilon_after": 0.81, "time": "2026-11-24T21:00:00+00:00", "run": "...",
                 "mechanism": "gaussian", "spend_epsilon": null}, ...]}
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from opacus.accountants import create_accountant

from clinfed.audit.log import read_records
from clinfed.audit.verify import LEDGER_FILE, unmatched_spends
from clinfed.errors import SiteRefusal
from clinfed.textio import json_default, one_line

try:  # POSIX advisory locks: what makes concurrent jobs (separate processes) safe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from clinfed.audit import AuditLog

__all__ = [
    "LEDGER_FILE",
    "MECHANISMS",
    "BudgetExceeded",
    "LedgerMismatch",
    "PrivacyLedger",
    "Spend",
    "compact_history",
    "epsilon_of",
]

MECHANISMS = ("gaussian", "laplace")


class BudgetExceeded(SiteRefusal):
    """The next spend would take the site past its own ε budget; the site refuses it."""


class LedgerMismatch(SiteRefusal):
    """The site's audit log records spends its ledger lacks: the ledger was lost, cut or rolled back."""


def compact_history(spends: list[tuple[float, float, int]]) -> list[list[float]]:
    """Merge consecutive spends with equal (noise multiplier, sample rate), as Opacus' accountant does."""
    history: list[list[float]] = []
    for nm, sr, steps in spends:
        if history and history[-1][0] == nm and history[-1][1] == sr:
            history[-1][2] += steps
        else:
            history.append([nm, sr, steps])
    return history


def epsilon_of(
    history: list[tuple[float, float, int]] | list[list[float]], delta: float, accountant: str = "rdp"
) -> float:
    """ε of a Gaussian spend history, computed by Opacus' accountant fed exactly that history."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(nm), float(sr), int(steps)) for nm, sr, steps in history]
    # never below 0: an RDP conversion at a large δ can go negative, and a negative ε would hand budget back
    return max(0.0, float(acc.get_epsilon(delta=delta)))


@dataclass
class Spend:
    job: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float  # the site's total ε (composition rule above) once this spend is added
    time: str
    run: str = ""  # the job run that spent it (a resumed job keeps its first run's key)
    mechanism: str = "gaussian"
    spend_epsilon: float | None = None  # laplace: this release's pure ε; gaussian: None (only the history composes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spend:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _invalid(spend: Spend) -> str | None:
    """Why a stored spend cannot be one the ledger wrote (None if it can): ε must never be computed from
    values `reserve` would have refused (a zero noise multiplier, a sample rate past 1, a negative ε)."""
    try:
        if spend.mechanism == "laplace":
            eps = float(spend.spend_epsilon) if spend.spend_epsilon is not None else float("nan")
            return None if math.isfinite(eps) and eps > 0 else f"laplace epsilon {spend.spend_epsilon!r}"
        if spend.mechanism != "gaussian":
            return f"mechanism {spend.mechanism!r}"
        nm, sr, steps = float(spend.noise_multiplier), float(spend.sample_rate), spend.steps
        if not isinstance(steps, int) or steps < 0 or not 0.0 < sr <= 1.0 or not math.isfinite(nm):
            return f"sample rate {spend.sample_rate!r}, steps {spend.steps!r}"
        if steps > 0 and not nm > 0.0:
            return f"noise_multiplier {spend.noise_multiplier!r}"
    except (TypeError, ValueError):
        return "non-numeric values"
    return None


def _gaussian(spends: list[Spend]) -> list[tuple[float, float, int]]:
    return [(s.noise_multiplier, s.sample_rate, s.steps) for s in spends if s.mechanism == "gaussian" and s.steps > 0]


def _pure(spends: list[Spend]) -> list[float]:
    return [float(s.spend_epsilon or 0.0) for s in spends if s.mechanism == "laplace"]


class PrivacyLedger:
    """Append-only record of one site's privacy spends, re-read and written under an OS file lock."""

    def __init__(
        self,
        path: str | Path,
        site: str,
        delta: float = 1e-5,
        accountant: str = "rdp",
        audit: AuditLog | None = None,
    ):
        self.path = Path(path)
        self.site, self.delta, self.accountant = site, delta, accountant
        self.audit = audit
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        if audit is not None and audit.participant != site:
            raise ValueError(f"{site}: the privacy ledger needs {site}'s own audit log, got {audit.participant}'s")
        with self._locked(exclusive=True):
            spends = self._read()
            self._check_audit(spends or [])
            if spends is None:
                self._write([])  # an empty ledger is a statement too: this site has spent nothing yet

    # ---------------------------------------------------------------------------------------------
    # reading

    @property
    def spends(self) -> list[Spend]:
        """Every spend, freshly read (another job may have spent since)."""
        with self._locked(exclusive=False):
            return self._read() or []

    @property
    def history(self) -> list[list[float]]:
        """[noise_multiplier, sample_rate, steps] of the Gaussian spends, exactly what the accountant consumes."""
        return compact_history(_gaussian(self.spends))

    @property
    def pure_epsilons(self) -> list[float]:
        """The pure ε of every Laplace release, in order; they add to the RDP ε (basic composition)."""
        return _pure(self.spends)

    def epsilon(self) -> float:
        """The site's total ε at its δ: ε_RDP(Gaussian history) + Σ ε_laplace."""
        return self._total(self.spends)

    def spends_of_run(self, run: str) -> list[Spend]:
        """The spends of one job run (nothing for an empty run key)."""
        return [s for s in self.spends if run and s.run == run]

    def history_of_run(self, run: str) -> list[list[float]]:
        """The Gaussian spends of one job run, e.g. the rounds a job completed before its server died."""
        return compact_history(_gaussian(self.spends_of_run(run)))

    def epsilon_of_run(self, run: str) -> float:
        """This run's own ε by the same composition rule: what the job alone released."""
        return self._total(self.spends_of_run(run))

    def epsilon_of_run_if(self, run: str, planned: list[tuple[float, float, int]], pure_epsilon: float = 0.0) -> float:
        """This run's own ε once `planned` (Gaussian spends) and `pure_epsilon` (Laplace) are added: what a
        whole job will have released by its end (admission reports it), by the same composition rule."""
        return self._total(self.spends_of_run(run), list(planned), [pure_epsilon] if pure_epsilon else [])

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the site would stand at after one more Gaussian spend."""
        return self._total(self.spends, [(noise_multiplier, sample_rate, steps)])

    # ---------------------------------------------------------------------------------------------
    # admission and spending

    def admit(self, budget: float | None, planned: list[tuple[float, float, int]], pure_epsilon: float = 0.0) -> float:
        """The site's total ε if the whole planned job were added; BudgetExceeded if over `budget`.

        `planned` holds the job's Gaussian spends (noise multiplier, sample rate, steps), `pure_epsilon`
        the sum of its Laplace releases. Nothing is written: admission decides before any training.
        """
        with self._locked(exclusive=False):
            spends = self._read() or []
            self._check_audit(spends)
        before = self._total(spends)
        after = self._total(spends, list(planned), [pure_epsilon] if pure_epsilon else [])
        if budget is not None and after > budget:
            raise BudgetExceeded(
                f"{self.site}: this job would take ε from {before:.2f} to {after:.2f} > budget {budget:g}; "
                "refusing the whole job"
            )
        return after

    def check(self, budget: float | None, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise BudgetExceeded if the planned Gaussian spend would exceed `budget`; return the ε it would reach."""
        spends = self.spends
        after = self._total(spends, [(noise_multiplier, sample_rate, steps)])
        if budget is not None and after > budget:
            raise BudgetExceeded(self._exhausted(self._total(spends), after, budget))
        return after

    def reserve(
        self,
        job: str,
        round_num: int,
        *,
        noise_multiplier: float = 0.0,
        sample_rate: float = 1.0,
        steps: int = 0,
        run: str = "",
        budget: float | None = None,
        mechanism: str = "gaussian",
        epsilon: float | None = None,
    ) -> Spend:
        """Charge one release to the ledger *before* it happens, or raise BudgetExceeded.

        Under the exclusive lock: re-read the ledger, refuse if the audit log holds spends it lacks,
        compute the site's total after this spend, refuse if over `budget`, else append, save and write
        the ``epsilon_spent`` audit record. If the work it pays for then fails, the spend stays charged:
        conservative (ε over-counted, never under-counted).

        ``gaussian``: `noise_multiplier`, `sample_rate`, `steps` (Gaussian output DP: σ/Δ₂, 1.0, 1).
        ``laplace``: `epsilon`, the release's pure ε.
        """
        draft = self._draft(job, round_num, noise_multiplier, sample_rate, steps, run, mechanism, epsilon)
        with self._locked(exclusive=True):
            spends = self._read() or []
            self._check_audit(spends)
            after = self._total([*spends, draft])
            if budget is not None and after > budget:
                raise BudgetExceeded(self._exhausted(self._total(spends), after, budget))
            draft.epsilon_after = after
            self._write([*spends, draft])
            if self.audit is not None:
                extra = {"spend_epsilon": draft.spend_epsilon} if mechanism == "laplace" else {}
                self.audit.append(
                    "epsilon_spent",
                    job=draft.job,
                    round=draft.round,
                    run=draft.run,
                    mechanism=draft.mechanism,
                    epsilon=after,
                    delta=self.delta,
                    noise_multiplier=draft.noise_multiplier,
                    sample_rate=draft.sample_rate,
                    steps=draft.steps,
                    **extra,
                )
        return draft

    def record(
        self, job: str, round_num: int, noise_multiplier: float, sample_rate: float, steps: int, run: str = ""
    ) -> Spend:
        """A Gaussian spend with no budget check (what earlier code called after a round)."""
        return self.reserve(
            job, round_num, noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, run=run
        )

    # ---------------------------------------------------------------------------------------------
    # internals

    def _draft(
        self,
        job: str,
        round_num: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        run: str,
        mechanism: str,
        epsilon: float | None,
    ) -> Spend:
        """The spend as it will be stored, after refusing arguments that would make ε meaningless."""
        if mechanism not in MECHANISMS:
            raise ValueError(f"{self.site}: unknown DP mechanism {mechanism!r} (known: {', '.join(MECHANISMS)})")
        if mechanism == "laplace":
            if epsilon is None or not math.isfinite(epsilon) or epsilon <= 0:
                raise ValueError(f"{self.site}: a laplace release needs a finite epsilon > 0, got {epsilon!r}")
            noise_multiplier, sample_rate, steps = 0.0, 0.0, 0
        else:
            if epsilon is not None:
                raise ValueError(f"{self.site}: a gaussian spend is given by its noise, not by epsilon={epsilon}")
            if int(steps) < 0 or not 0.0 < float(sample_rate) <= 1.0:
                raise ValueError(f"{self.site}: invalid gaussian spend (sample rate {sample_rate}, steps {steps})")
            if int(steps) > 0 and not float(noise_multiplier) > 0.0:
                raise ValueError(f"{self.site}: a gaussian spend needs noise_multiplier > 0, got {noise_multiplier}")
        return Spend(
            job=str(job),
            round=int(round_num),
            noise_multiplier=float(noise_multiplier),
            sample_rate=float(sample_rate),
            steps=int(steps),
            epsilon_after=0.0,
            time=datetime.now(UTC).isoformat(timespec="seconds"),
            run=str(run),
            mechanism=mechanism,
            spend_epsilon=float(epsilon) if mechanism == "laplace" and epsilon is not None else None,
        )

    def _total(
        self,
        spends: list[Spend],
        gaussian: list[tuple[float, float, int]] | None = None,
        pure: list[float] | None = None,
    ) -> float:
        """The composition rule: ε_RDP of the Gaussian history (plus `gaussian`) + Σ pure ε (plus `pure`)."""
        history = compact_history([*_gaussian(spends), *(g for g in gaussian or [] if g[2] > 0)])
        return epsilon_of(history, self.delta, self.accountant) + sum(_pure(spends)) + sum(pure or [])

    def _exhausted(self, before: float, after: float, budget: float) -> str:
        return (
            f"{self.site}: privacy budget exhausted (ε spent {before:.3f}, this release would reach "
            f"{after:.3f} > budget {budget:.3f})"
        )

    def _check_audit(self, spends: list[Spend]) -> None:
        """Refuse when the site's audit log records spends this ledger lacks (caller holds the lock)."""
        if self.audit is None:
            return
        records = [r for r in read_records(self.audit.path, "epsilon_spent") if r.get("participant") == self.site]
        if not records:
            return
        lacking, _ = unmatched_spends(records, [asdict(s) for s in spends])
        if lacking:
            first = lacking[0]
            raise LedgerMismatch(
                f"{self.site}: audit log records {len(lacking)} privacy spends its ledger lacks "
                f"(first: job {first.get('job')} round {first.get('round')}); "
                f"refusing to train until the ledger {self.path} is restored"
            )

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """Hold ``flock`` on the sidecar lock file (never on the ledger, which os.replace swaps out)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read(self) -> list[Spend] | None:
        """The spends on disk (None when there is no file); adopts the file's own δ and accountant."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            spends = [Spend.from_dict(s) for s in data.get("spends", [])]
        except (ValueError, TypeError, AttributeError) as exc:
            raise LedgerMismatch(
                f"{self.site}: privacy ledger {self.path} is unreadable ({one_line(exc)}); "
                "refusing to train until it is restored"
            ) from None
        if data.get("site", self.site) != self.site:
            raise ValueError(f"{self.site}: ledger {self.path} belongs to {data.get('site')}")
        # δ and accountant are the site policy's, never the file's (issue 23, item 6): a file that says
        # δ = 0.5 must not turn the site's spends into a smaller ε. Each spend must be a valid one.
        for i, spend in enumerate(spends):
            problem = _invalid(spend)
            if problem:
                raise LedgerMismatch(
                    f"{self.site}: privacy ledger {self.path} spend {i} is invalid ({problem}); "
                    "refusing to train until it is restored"
                )
        return spends

    def _write(self, spends: list[Spend]) -> None:
        """Atomic replace (temporary file, fsync, rename, fsync of the folder); caller holds the lock."""
        payload = {
            "site": self.site,
            "delta": self.delta,
            "accountant": self.accountant,
            "spends": [asdict(s) for s in spends],
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(payload, fh, indent=1, default=json_default)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)


def site_ledger(root: Path, site: str, policy: Any, audit: AuditLog | None = None) -> PrivacyLedger:
    """The site's own ledger (`<root>/local/privacy_ledger.json`) at the δ and accountant of its policy
    (`clinfed.fl.participant.SitePolicy`), cross-checked with its audit log: what every job opens."""
    return PrivacyLedger(
        Path(root) / "local" / LEDGER_FILE,
        site,
        delta=float(policy.delta),
        accountant=str(policy.accountant),
        audit=audit,
    )
