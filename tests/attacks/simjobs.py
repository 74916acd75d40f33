"""Helpers for attacks that need a real simulator run of a job whose exported settings were edited."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace


def tampered_job(name: str, **dp_overrides):
    """A stand-in for `jobs/<name>/job.py` whose executor's dp_args are edited after the recipe was
    built: exactly what a lead does to an exported job's config_fed_client.json before submitting it."""
    from clinfed.jobs import load_job

    real = load_job(name)

    def make_recipe(**kwargs):
        recipe = real.make_recipe(**kwargs)
        executor = recipe._job._deploy_map["@ALL"].app_config.executors[0].executor
        executor.dp_args.update(dp_overrides)
        return recipe

    return SimpleNamespace(DEFAULTS=real.DEFAULTS, make_recipe=make_recipe)


def ledger_spends(site_root: Path) -> list[dict]:
    path = Path(site_root) / "local" / "privacy_ledger.json"
    return json.loads(path.read_text()).get("spends", []) if path.exists() else []
