"""A site's persistent privacy ledger: every DP-SGD spend, across rounds and jobs, and the ε it implies.

Like Opacus' `RDPAccountant`, the only state is the history of spends (noise multiplier, sample rate,
steps); ε is recomputed from it on demand with Opacus' accountant, never cached or trusted from a
file. The ledger lives in the site's own `local/` folder, so a new job on the same site starts from
what earlier jobs spent, and the budget comes from the site's policy, not from the job: a job cannot
raise it.

File format (`local/privacy_ledger.json`)::

    {"site": "site-1", "delta": 1e-05, "accountant": "rdp",
     "spends": [{"job": "...", "round": 0, "noise_multiplier": 1.57, "sample_rate": 0.2, "steps": 5,
                 "epsilon_after": 0.81, "time": "2026-11-24T21:00:00+00:00"}, ...]}
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from opacus.accountants import create_accountant

LEDGER_FILE = "privacy_ledger.json"


class BudgetExceeded(RuntimeError):
    """The next spend would take the site past its own ε budget; the site refuses the round."""


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
    """ε of a spend history, computed by Opacus' accountant fed exactly that history."""
    if not history:
        return 0.0
    acc = create_accountant(accountant)
    acc.history = [(float(nm), float(sr), int(steps)) for nm, sr, steps in history]
    return float(acc.get_epsilon(delta=delta))


@dataclass
class Spend:
    job: str
    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon_after: float
    time: str
    run: str = ""  # the job run that spent it (a resumed job keeps its first run's key)


class PrivacyLedger:
    """Append-only record of one site's privacy spends, persisted atomically after every spend."""

    def __init__(self, path: str | Path, site: str, delta: float = 1e-5, accountant: str = "rdp"):
        self.path = Path(path)
        self.site, self.delta, self.accountant = site, delta, accountant
        self._lock = threading.Lock()
        self.spends: list[Spend] = []
        if self.path.exists():
            data = json.loads(self.path.read_text())
            if data.get("site", site) != site:
                raise ValueError(f"{site}: ledger {self.path} belongs to {data.get('site')}")
            # δ and the accountant are fixed by the first spend: mixing them would make ε meaningless.
            self.delta = float(data.get("delta", delta))
            self.accountant = data.get("accountant", accountant)
            self.spends = [Spend(**s) for s in data.get("spends", [])]
        else:
            self._save()  # an empty ledger is a statement too: this site has spent nothing yet

    @property
    def history(self) -> list[list[float]]:
        """[noise_multiplier, sample_rate, steps] entries, exactly what the accountant consumes."""
        return compact_history([(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spends])

    def epsilon(self) -> float:
        return epsilon_of(self.history, self.delta, self.accountant)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """ε the site would stand at after one more spend (the pre-round budget check)."""
        spends = [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spends]
        return epsilon_of(
            compact_history([*spends, (noise_multiplier, sample_rate, steps)]), self.delta, self.accountant
        )

    def check(self, budget: float | None, noise_multiplier: float, sample_rate: float, steps: int) -> float:
        """Raise BudgetExceeded if the planned spend would exceed `budget`; return the ε it would reach."""
        after = self.epsilon_if(noise_multiplier, sample_rate, steps)
        if budget is not None and after > budget:
            raise BudgetExceeded(
                f"{self.site}: privacy budget exhausted (ε spent {self.epsilon():.3f}, this round would reach "
                f"{after:.3f} > budget {budget:.3f})"
            )
        return after

    def history_of_run(self, run: str) -> list[list[float]]:
        """The spends of one job run, e.g. the rounds a job completed before its server died."""
        return compact_history(
            [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spends if run and s.run == run]
        )

    def record(
        self, job: str, round_num: int, noise_multiplier: float, sample_rate: float, steps: int, run: str = ""
    ) -> Spend:
        with self._lock:
            spends = [(s.noise_multiplier, s.sample_rate, s.steps) for s in self.spends]
            eps = epsilon_of(
                compact_history([*spends, (noise_multiplier, sample_rate, steps)]), self.delta, self.accountant
            )
            spend = Spend(
                job=job,
                round=round_num,
                noise_multiplier=float(noise_multiplier),
                sample_rate=float(sample_rate),
                steps=int(steps),
                epsilon_after=eps,
                time=datetime.now(UTC).isoformat(timespec="seconds"),
                run=run,
            )
            self.spends.append(spend)
            self._save()
            return spend

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "site": self.site,
            "delta": self.delta,
            "accountant": self.accountant,
            "spends": [s.__dict__ for s in self.spends],
        }
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ledger-")
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
