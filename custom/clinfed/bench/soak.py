"""`clinfed bench soak`: many rounds of breast_cancer_dp in FLARE's simulator, memory per round.

A consortium runs for days; a leak of a few MB a round (ciphertexts kept alive, an accountant history
that grows without merging, FLARE messages held) shows up here long before it takes a site down.
Each site reports its own resident set size after every round, the server records its own, and
the benchmark compares round 5 with the last round for the largest process.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from clinfed.simulate import SimulationRequest, run_simulation


def run_soak(rounds: int = 30, sites: int = 3, out: Path | None = None) -> dict:
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="clinfed-soak-"))
    start = time.monotonic()
    summary = run_simulation(SimulationRequest(job="breast_cancer_dp", sites=sites, rounds=rounds, out=out))
    seconds = time.monotonic() - start
    series: dict[str, list[float]] = {"server": [r.get("server_rss_mb", float("nan")) for r in summary["rounds"]]}
    for site in summary["sites"]:
        series[site] = [
            r["sites"].get(site, {}).get("metrics", {}).get("rss_mb", float("nan")) for r in summary["rounds"]
        ]
    largest = max(series, key=lambda k: max(series[k]))
    rss = series[largest]
    ref = rss[min(4, len(rss) - 1)]
    return {
        "rounds": rounds,
        "sites": sites,
        "rounds_completed": summary["rounds_completed"],
        "seconds": seconds,
        "largest_process": largest,
        "rss_mb": rss,
        "rss_mb_by_process": series,
        "growth_round5_to_last": rss[-1] / ref - 1.0 if ref else float("nan"),
        "final_auc": summary["final"]["metrics"].get("auc"),
        "summary": str(out / "summary.json"),
    }


def format_table(result: dict) -> str:
    lines = [f"{'process':<10} {'round 1':>8} {'round 5':>8} {'last':>8}  (RSS MB)"]
    for name, rss in result["rss_mb_by_process"].items():
        r5 = rss[min(4, len(rss) - 1)]
        lines.append(f"{name:<10} {rss[0]:>8.1f} {r5:>8.1f} {rss[-1]:>8.1f}")
    lines.append(
        f"largest: {result['largest_process']}, growth round 5 → {result['rounds']}: "
        f"{100 * result['growth_round5_to_last']:+.1f} %  ({result['seconds']:.0f} s, final AUC {result['final_auc']})"
    )
    return "\n".join(lines)
