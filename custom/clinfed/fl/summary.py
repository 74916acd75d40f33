"""summary.json: what a run of a training job produced, written by the server into its run folder.

The schema (docs/summary-schema.md) is a contract: the CLI, tests and users read these names.
"""

from __future__ import annotations

import json
from pathlib import Path

from clinfed.textio import json_default

SUMMARY_FILE = "summary.json"


def training_summary(
    *,
    job: str,
    sites: list[str],
    completed: int,
    encrypted: bool,
    rounds: list[dict],
    final: dict,
    privacy: dict,
    admission: dict,
    resumed_at: int,
    submission: str,
    extra: dict | None = None,
    compression: dict | None = None,
) -> dict:
    """The run's summary; `bytes_sent` totals each site's uploads over the rounds (each round's are in
    `rounds[].sites[SITE].bytes_sent`), `compression` is None for dense updates."""
    totals: dict[str, int] = {}
    for rnd in rounds:
        for site, entry in rnd.get("sites", {}).items():
            totals[site] = totals.get(site, 0) + int(entry.get("bytes_sent", 0) or 0)
    return {
        "job": job,
        "sites": sites,
        "rounds_completed": completed,
        "encrypted": encrypted,
        "rounds": rounds,
        "final": final,
        "privacy": privacy,
        "admission": admission,
        "resumed_at_round": resumed_at,
        "submission": submission,
        "bytes_sent": totals,
        "compression": compression,
        **(extra or {}),
    }


def write_summary(run_dir: str | Path, summary: dict) -> Path:
    path = Path(run_dir) / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, default=json_default))
    return path
