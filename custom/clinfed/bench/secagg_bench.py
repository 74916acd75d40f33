"""What secure aggregation against a malicious server costs: one round beside FLARE's HE, setup vs sites.

Issue 22 asks for three numbers, measured in one run so that they share the machine's load:

- **the round**: ``ours_secagg`` (masked compact uploads, signed reveals, unmasking at the decrypting
  site) beside ``plaintext``, ``flare_he`` and ``ours`` in :func:`clinfed.bench.he_bench.run_he_bench`
  (same model, same sites, interleaved repeats): upload bytes per parameter and round time, and the
  ratios to FLARE's HE and to ``ours`` (what the masks add);
- **setup vs sites**: the once-per-run cost per site (X25519 key and kit signature, then checking every
  other site's certificate and signature and deriving the pair secrets), for 3, 10 and 20 sites by
  default: it grows linearly per site (quadratic in total), the reason it is paid once per run;
- **large** (optional, ``large_params``): one ``ours_secagg`` round of a model that size over
  ``large_sites`` sites, wall seconds end to end (site encryption serialised, as one process runs
  every role), the "25 M parameters × 20 sites" check.

The bench reuses the HE bench's contenders rather than a copy: a change to the wire format shows here
and in ``bench he`` alike.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from clinfed.bench.he_bench import run_he_bench, secagg_setup

ROUND_CONTENDERS = ("plaintext", "flare_he", "ours", "ours_secagg")
SETUP_SITES = (3, 10, 20)


def run_secagg_bench(
    params: int = 1_000_000,
    sites: int = 3,
    repeats: int = 3,
    setup_sites: Sequence[int] = SETUP_SITES,
    large_params: int | None = None,
    large_sites: int = 20,
) -> dict[str, Any]:
    """``{"round": {contender: row}, "setup": [row per site count], "large": row | None}``."""
    if any(n < 3 for n in setup_sites):
        raise ValueError(f"secure aggregation needs at least 3 sites, got setup sites {list(setup_sites)}")
    result: dict[str, Any] = {
        "round": run_he_bench(params=params, sites=sites, contenders=ROUND_CONTENDERS, repeats=repeats)
    }
    setup = []
    for n in setup_sites:
        with tempfile.TemporaryDirectory(prefix="clinfed-secagg-setup-") as tmp:
            _, row = secagg_setup(n, Path(tmp) / "kits")
        setup.append(row)
    result["setup"] = setup
    result["large"] = None
    if large_params:
        start = time.perf_counter()
        row = run_he_bench(params=large_params, sites=large_sites, contenders="ours_secagg", repeats=1)["ours_secagg"]
        result["large"] = {**row, "wall_seconds": time.perf_counter() - start}
    return result


def ratios(result: dict) -> dict[str, float]:
    """ours_secagg against FLARE's HE and against ours (bytes up, round time)."""
    rows = result["round"]
    secagg, out = rows["ours_secagg"], {}
    for other in ("flare_he", "ours", "plaintext"):
        if other in rows:
            out[f"bytes_vs_{other}"] = secagg["bytes_per_param"] / rows[other]["bytes_per_param"]
            if rows[other]["round_seconds"] > 0:
                out[f"round_vs_{other}"] = secagg["round_seconds"] / rows[other]["round_seconds"]
    return out


def markdown_table(result: dict) -> str:
    """The three parts as docs/benchmarks.md shows them (rendered from the JSON by bench/tables.py)."""
    from clinfed.bench.tables import he_table

    lines = [he_table(result["round"]), ""]
    r = ratios(result)
    lines.append(
        f"ours_secagg vs FLARE HE: {r['bytes_vs_flare_he']:.2f}× bytes up, {r['round_vs_flare_he']:.2f}× round "
        f"time; vs ours (no masks): {r['bytes_vs_ours']:.2f}× bytes, {r['round_vs_ours']:.2f}× round time."
    )
    lines += ["", "| sites | setup s per site | B up per site | B down per site |", "|---:|---:|---:|---:|"]
    for row in result["setup"]:
        lines.append(
            f"| {row['sites']} | {row['seconds_per_site']:.3f} | {row['bytes_up_per_site']:,.0f} | "
            f"{row['bytes_down_per_site']:,.0f} |"
        )
    large = result.get("large")
    if large:
        lines += [
            "",
            f"Large: one ours_secagg round of {large['params']:,} parameters × {large['sites']} sites took "
            f"{large['wall_seconds'] / 60:.1f} min end to end in one process ({large['bytes_per_param']:.2f} B/param "
            f"up, max rel error {large['max_rel_error']:.1e}).",
        ]
    return "\n".join(lines)


def format_table(result: dict) -> str:
    return markdown_table(result)
