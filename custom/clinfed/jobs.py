"""The bundled jobs: each is a folder under `jobs/` whose `job.py` builds a FLARE Recipe.

Job folders hold configuration only; this module finds them (the repository's `jobs/`, or
CLINFED_JOBS_DIR for an installed bundle) and calls their `make_recipe`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

JOB_NAMES = (
    "breast_cancer_dp",
    "segmentation_dp",
    "segmentation3d_dp",
    "cohort_stats",
    "psi_linkage",
    "survival_km",
    "cox_ph",
    "glm",
    "key_exchange",
    # the statistician's toolbox (issue 24)
    "crosstab",
    "ttest",
    "correlation",
    "cumulative_incidence",
)


class UnknownJob(ValueError):
    pass


def jobs_dir() -> Path:
    env = os.environ.get("CLINFED_JOBS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "jobs"


def available_jobs() -> list[str]:
    return sorted(p.parent.name for p in jobs_dir().glob("*/job.py"))


def load_job(name: str) -> ModuleType:
    path = jobs_dir() / name / "job.py"
    if not path.exists():
        known = ", ".join(available_jobs()) or "none"
        raise UnknownJob(f"unknown job '{name}' (available: {known})")
    spec = importlib.util.spec_from_file_location(f"clinfed_job_{name}", path)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module
