"""What a job can check before it is submitted: its variables against the split it will run on.

A `clinfed data split` folder names, in its split.json, the bundled dataset its site databases were
cut from; that public reference table is what a job's columns, levels and bounds are checked against
(no site's rows are read). Kept apart from `sums_fl` (the FLARE pair) so that `cohort_data` and the
job folders can use it without importing the protocol, which imports the methods, which import them.
"""

from __future__ import annotations

import json
from pathlib import Path


def split_manifest(data_dir: str | Path | None) -> dict | None:
    """`split.json` of a `clinfed data split` folder (which dataset, sites, events per site), or None."""
    if not data_dir:
        return None
    from clinfed.data.sitedb import MANIFEST

    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def check_split(manifest: dict | None, sites: int, columns: list[str], numeric: list[str], needs_events: bool):
    """Validate a job's variables against the bundled dataset a split was made from; the pooled frame.

    One-line ValueErrors: fewer sites in the split than asked for, an unknown column (listing the
    known ones), a text covariate without encoding, a site without events (Cox).
    """
    if manifest is None:
        return None
    from clinfed.analytics.omop_source import reference_frame

    name = manifest["dataset"]
    frame = reference_frame(manifest)  # the bundled dataset, or the pooled OMOP cohort
    have = len(manifest.get("sites", {}))
    if have < sites:
        raise ValueError(f"the split of {name} has {have} site databases, the job asks for {sites} sites")
    unknown = [c for c in columns if c not in frame.columns]
    if unknown:
        raise ValueError(f"{name} has no column {unknown[0]!r} (has: {', '.join(map(str, frame.columns))})")
    text = [c for c in numeric if frame[c].dtype.kind not in "biuf"]
    if text:
        raise ValueError(
            f"covariate {text[0]!r} of {name} is text ({frame[text[0]].dropna().iloc[0]!r}...): encode it first"
        )
    if needs_events:
        empty = [s for s, info in manifest.get("sites", {}).items() if int(info.get("events", 1)) == 0]
        if empty:
            raise ValueError(f"{empty[0]} has no events in the split of {name}: a Cox fit needs events at every site")
    return frame
