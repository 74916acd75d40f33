"""The submission side of a job on an OMOP CDM folder (`clinfed data omop`) with a cohort definition.

A job over a `clinfed data split` folder checks its variables against the bundled dataset the split
names (`sums_fl.check_split`); over a CDM folder the variables are the cohort's (time, event, the
covariates it defines), and the public reference is the same cohort built with pandas on the
pooled bundled CDM (`clinfed.data.omop.reference_cohort`). The definition travels in the job's
method config as ``omop_cohort``; each site builds its own rows from its CDM with it
(`clinfed.data.source.site_table`).
"""

from __future__ import annotations

from pathlib import Path

from clinfed.analytics.sums_fl import split_manifest
from clinfed.data import omop

KIND = "omop-cdm"
#: the method-config key holding the cohort definition (``cohort`` is cohort_stats' all|intersect)
CONFIG_KEY = "omop_cohort"


def job_manifest(data_dir: str | Path | None, cohort_file: str | Path | None = None) -> dict | None:
    """What a job checks its variables against: a split's split.json, or for a CDM folder its
    omop.json with the parsed cohort definition under ``cohort``. One-line ValueErrors: a CDM folder
    without a cohort file, a cohort file without a CDM folder, a concept the vocabulary lacks."""
    manifest = omop.omop_manifest(data_dir)
    if manifest is None:
        if cohort_file is not None:
            raise ValueError(
                f"--cohort {cohort_file}: a cohort definition needs --data-dir of a `clinfed data omop` folder"
            )
        return split_manifest(data_dir)
    if cohort_file is None:
        raise ValueError(f"{data_dir} is an OMOP CDM folder: give the cohort definition with --cohort FILE")
    definition = omop.load_cohort_file(cohort_file)
    omop.check_concepts(definition)
    return {**manifest, "kind": KIND, "dataset": f"cohort '{definition['name']}'", "cohort": definition}


def reference_frame(manifest: dict):
    """The public reference table of a job's manifest: the pooled cohort (OMOP) or the bundled dataset."""
    if manifest.get("kind") == KIND:
        return omop.reference_cohort(manifest["cohort"]).drop(columns=["person_id"])
    from clinfed.data.clinical import load_dataset

    return load_dataset(manifest["dataset"])


def method_fields(manifest: dict | None) -> dict:
    """The method-config fields a job adds for its data source: the cohort definition, or nothing."""
    if manifest and manifest.get("kind") == KIND:
        return {CONFIG_KEY: manifest["cohort"]}
    return {}
