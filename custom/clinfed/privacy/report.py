"""`clinfed privacy report PATH`: what each site has spent, read from the sites' own ledgers."""

from __future__ import annotations

import json
from pathlib import Path

from clinfed.privacy.ledger import LEDGER_FILE, PrivacyLedger


def find_ledgers(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    return sorted(path.rglob(LEDGER_FILE))


def _policy_accounting(ledger_file: Path, data: dict) -> tuple[float, str]:
    """δ and accountant of the site's policy (`local/resources.json` beside the ledger), as the site
    computes ε; only without a policy there, the ones the ledger file records (for display: a site
    never takes them from the file, issue 23)."""
    resources = ledger_file.parent / "resources.json"
    section = {}
    if resources.is_file():
        section = json.loads(resources.read_text()).get("clinfed", {}) or {}
    delta = section.get("delta", data.get("delta", 1e-5) if not resources.is_file() else 1e-5)
    accountant = section.get("accountant", data.get("accountant", "rdp") if not resources.is_file() else "rdp")
    return float(delta), str(accountant)


def report(path: str | Path) -> str:
    """One block per site: its spends by job and round, and ε recomputed from the full history
    (Gaussian spends composed in RDP, Laplace releases added: the ledger's composition rule)."""
    ledgers = find_ledgers(path)
    if not ledgers:
        raise FileNotFoundError(f"no {LEDGER_FILE} under {path}")
    lines = []
    for file in ledgers:
        data = json.loads(file.read_text())
        delta, accountant = _policy_accounting(file, data)
        ledger = PrivacyLedger(file, data.get("site", file.parent.parent.name), delta=delta, accountant=accountant)
        lines.append(
            f"{ledger.site}: ε = {ledger.epsilon():.3f} (δ = {ledger.delta:g}, {ledger.accountant}) "
            f"over {len(ledger.spends)} spends — {file}"
        )
        lines.append(f"  {'job':<20} {'round':>5} {'mechanism':<9} {'noise':>8} {'q':>7} {'steps':>6} {'ε after':>8}")
        for s in ledger.spends:
            if s.mechanism == "laplace":
                what = f"{'laplace':<9} {'ε ' + format(s.spend_epsilon or 0.0, '.3f'):>23}"
            else:
                what = f"{s.mechanism:<9} {s.noise_multiplier:>8.4f} {s.sample_rate:>7.4f} {s.steps:>6}"
            lines.append(f"  {s.job:<20} {s.round:>5} {what} {s.epsilon_after:>8.3f}")
    return "\n".join(lines)
