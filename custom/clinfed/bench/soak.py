"""`clinfed bench soak`: many rounds of breast_cancer_dp in FLARE's simulator, memory per round.

A consortium runs for days; a leak of a few MB a round (ciphertexts kept alive, an accountant history
that grows without merging, FLARE messages held) shows up here long before it takes a site down.
Each site reports its own resident set size after every round, the server records its own, and
the benchmark reports, per process, the least-squares slope of RSS against the round number from
round 5 on (`slope_mb_per_round`: rounds 1-4 are warm-up, imports and first-use caches), the largest
of those slopes, and the growth of the largest process from round 5 to the last.

FLARE's streaming layer remembers every *reliable* stream a process has received (at a site: the
task replies, including the global model) for its retry window, `streaming_retry_timeout` +
`streaming_retry_wait` (60 s + 5 s by default), with one timer thread each, so that a chunk the
sender retries is not delivered twice. That memory is bounded by the window, not by the number of
rounds, but at ~2.5 s a round it fills the first 26 rounds of a soak and reads as ~0.2-0.5 MB a
round at each site. The simulator's processes talk over loopback and never retry a chunk, so the
soak runs them with a short window (`FLARE_RETRY_WINDOW`, through FLARE's own NVFLARE_* settings)
and records it in its result; `flare_retry_window=None` measures FLARE's defaults instead.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from pathlib import Path

from clinfed.simulate import SimulationRequest, run_simulation

SLOPE_FROM_ROUND = 5  # 1-based: the slope is fitted from this round to the last
FLARE_RETRY_WINDOW = (3.0, 1.0)  # seconds: streaming_retry_timeout, streaming_retry_wait (see above)
_RETRY_ENV = ("NVFLARE_STREAMING_RETRY_TIMEOUT", "NVFLARE_STREAMING_RETRY_WAIT")


def slope_mb_per_round(rss: list[float], from_round: int = SLOPE_FROM_ROUND) -> float:
    """Least-squares slope (MB per round) of `rss` (one value per round, round 1 first) from
    `from_round` on; rounds without a reading (NaN) are left out. NaN with fewer than 2 readings."""
    points = [
        (i, float(v)) for i, v in enumerate(rss, start=1) if i >= from_round and v is not None and math.isfinite(v)
    ]
    if len(points) < 2:
        return float("nan")
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


def run_soak(
    rounds: int = 30,
    sites: int = 3,
    out: Path | None = None,
    flare_retry_window: tuple[float, float] | None = FLARE_RETRY_WINDOW,
) -> dict:
    out = Path(out) if out else Path(tempfile.mkdtemp(prefix="clinfed-soak-"))
    previous = {name: os.environ.get(name) for name in _RETRY_ENV}
    if flare_retry_window is not None:  # read by the simulator's server and site processes at start
        os.environ.update({name: str(float(v)) for name, v in zip(_RETRY_ENV, flare_retry_window, strict=True)})
    start = time.monotonic()
    try:
        summary = run_simulation(SimulationRequest(job="breast_cancer_dp", sites=sites, rounds=rounds, out=out))
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    seconds = time.monotonic() - start
    series: dict[str, list[float]] = {"server": [r.get("server_rss_mb", float("nan")) for r in summary["rounds"]]}
    for site in summary["sites"]:
        series[site] = [
            r["sites"].get(site, {}).get("metrics", {}).get("rss_mb", float("nan")) for r in summary["rounds"]
        ]
    largest = max(series, key=lambda k: max((v for v in series[k] if math.isfinite(v)), default=-math.inf))
    rss = series[largest]
    ref = rss[min(SLOPE_FROM_ROUND - 1, len(rss) - 1)]
    slopes = {name: slope_mb_per_round(values) for name, values in series.items()}
    finite = [v for v in slopes.values() if math.isfinite(v)]
    return {
        "rounds": rounds,
        "sites": sites,
        "rounds_completed": summary["rounds_completed"],
        "seconds": seconds,
        "largest_process": largest,
        "rss_mb": rss,
        "rss_mb_by_process": series,
        "growth_round5_to_last": rss[-1] / ref - 1.0 if ref else float("nan"),
        "slope_from_round": SLOPE_FROM_ROUND,
        "flare_retry_window_s": list(flare_retry_window) if flare_retry_window is not None else "flare defaults",
        "slope_mb_per_round": slopes,
        "largest_process_slope_mb_per_round": slopes[largest],
        "max_slope_mb_per_round": max(finite) if finite else float("nan"),
        "final_auc": summary["final"]["metrics"].get("auc"),
        "summary": str(out / "summary.json"),
    }


def format_table(result: dict) -> str:
    first = result.get("slope_from_round", SLOPE_FROM_ROUND)
    head = f"{'process':<10} {'round 1':>8} {'round ' + str(first):>8} {'last':>8} {'MB/round':>9}"
    lines = [f"{head}  (RSS MB; MB/round: least-squares slope from round {first} to the last)"]
    for name, rss in result["rss_mb_by_process"].items():
        r5 = rss[min(first - 1, len(rss) - 1)]
        slope = result["slope_mb_per_round"][name]
        lines.append(f"{name:<10} {rss[0]:>8.1f} {r5:>8.1f} {rss[-1]:>8.1f} {slope:>+9.3f}")
    lines.append(
        f"largest: {result['largest_process']}, growth round {first} → {result['rounds']}: "
        f"{100 * result['growth_round5_to_last']:+.1f} %, "
        f"slope {result['largest_process_slope_mb_per_round']:+.3f} MB/round; "
        f"steepest slope of any process {result['max_slope_mb_per_round']:+.3f} MB/round  "
        f"({result['seconds']:.0f} s, final AUC {result['final_auc']}; "
        f"FLARE streaming retry window {result.get('flare_retry_window_s', 'flare defaults')})"
    )
    return "\n".join(lines)
