"""`cohort_stats` as a strategy of the one encrypted-sums job (`sums_fl`), like Kaplan–Meier, Cox and GLM.

Two phases, each one round of the generic protocol (every site sends an encrypted vector, the server
adds, the key-holding release site decrypts and steps):

=============  ===================================================================================
``sums``       each site: `stats.local_sums` (rows, counts, Σx/scale, histograms, fine quantile
               histograms, level counts, events and person-time/bound, its own contributor slot).
               The release site decrypts the pooled sum and keeps it; it sends back, *encrypted*,
               the pooled means and (without output DP) the cells an exact release would show.
``deviations`` each site decrypts the means and the preview, asks its release log whether that
               release may go out beside its earlier ones (`release_log`: refused, nothing sent,
               when it would make a withheld cell derivable), then sends Σ(x − mean)²/scale².
               The release site decrypts it, runs `stats.release` (noise, suppression, quantiles,
               proportions, rates), consults its own release log once more and releases.
=============  ===================================================================================

Why the release site and not every site decrypts pass 1 (as cohort_stats' earlier own FLARE pair did): the
other key holders then see only the means and the cells that will be released anyway, not the
pooled fine histograms. The arithmetic is `clinfed.analytics.stats` (numpy only); the rows come
from `clinfed.analytics.cohort_data` (database, CSV, bundled share, PSI-linked cohort).

Output DP (``config["dp"]`` = {epsilon, mechanism "laplace"|"gaussian", delta}): the noise plan is
`stats.noise_plan`'s (one budget split over four families), added inside `stats.release` at the
release site; every site charges its ledger first: a Laplace release's pure ε, or a Gaussian
release's one RDP spend at `stats.gaussian_noise_multiplier`. Output-DP releases skip the release log
(their noise covers differencing, and the ledger charges them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clinfed.analytics import stats
from clinfed.analytics.cohort_data import COHORTS, group_masks, load_cohort
from clinfed.analytics.methods import Method, SiteInfo, Step
from clinfed.analytics.release_log import CohortDefinition, ReleaseLog, cells_of, data_digest
from clinfed.errors import SiteRefusal

#: Preview cells travel in the iterate as count · 2^-12: exact on the iterate's 2^-40 grid, and
#: under its 2^53 ceiling for counts up to 2^25.
CELL_SCALE = 2.0**-12


def flatten_cells(cells: Mapping[str, dict]) -> np.ndarray:
    """`release_log.cells_of`'s structure as one vector (count, then histogram, per key and group; −1
    where withheld): how the preview reaches the sites inside the encrypted iterate."""
    out: list[float] = []
    for entry in cells.values():
        for cell in entry["cells"].values():
            out += [-1.0 if v is None else float(v) for v in (cell["count"], *cell["histogram"])]
    return np.asarray(out, dtype=np.float64)


def unflatten_cells(template: Mapping[str, dict], vec: np.ndarray) -> dict[str, dict]:
    """The inverse of `flatten_cells` on `template` (`cells_of(spec, {})`: the job's keys and sizes)."""
    values = iter(np.rint(np.asarray(vec, dtype=np.float64)).astype(np.int64).tolist())
    out: dict[str, dict] = {}
    for key, entry in template.items():
        cells = {}
        for group, cell in entry["cells"].items():
            count = next(values)
            hist = [next(values) for _ in cell["histogram"]]
            cells[group] = {
                "count": None if count < 0 else int(count),
                "histogram": [None if v < 0 else int(v) for v in hist],
            }
        out[key] = {"grid": list(entry["grid"]), "cells": cells}
    return out


@dataclass
class CohortSite:
    """What a site holds for the job: its rows as `stats` wants them and where its release log lives."""

    x: np.ndarray
    masks: dict[str, np.ndarray]
    columns: dict
    digest: str
    info: SiteInfo | None = None


class CohortStats(Method):
    """Descriptive statistics per group and feature, proportions and an incidence rate (module doc).

    Config: spec (`StatsSpec.to_dict`), group_values ({group: value of group_column}), group_column,
    cohort ("all" | "intersect"), id_column, max_bins_percent, dp (None | {epsilon, mechanism, delta}).
    """

    block = "statistics"
    first_phase = "sums"
    max_rounds = 2
    #: `stats` keeps every slot under the CKKS bound itself (sums divided by public bounds, counts ≤
    #: rows) and checks counts come back whole: one limb, half the ciphertexts of two.
    wire_limbs = 1

    def __init__(self, config: Mapping[str, Any]):
        super().__init__(config)
        self.spec = stats.StatsSpec.from_dict(self.config["spec"])
        self.group_values = dict(self.config.get("group_values") or {})
        self.group_column = str(self.config.get("group_column") or "")
        self.cohort = str(self.config.get("cohort", "all"))
        self.id_column = str(self.config.get("id_column") or "patient_id")
        pct = self.config.get("max_bins_percent", 10.0)
        self.max_bins_percent = None if pct is None else float(pct)
        if self.cohort not in COHORTS:
            raise ValueError(f"cohort must be one of {', '.join(COHORTS)}, got '{self.cohort}'")
        values = [str(v) for v in self.group_values.values()]
        if len(set(values)) != len(values):
            raise ValueError(f"two groups share a value of '{self.group_column}': groups must not overlap")
        missing = [g for g in self.spec.groups[1:] if g not in self.group_values]
        if missing:
            raise ValueError(f"no value of '{self.group_column}' given for group(s) {missing}")
        self._sums: stats.Sums | None = None
        self._template = cells_of(self.spec, {})

    # --- configuration checks and privacy ------------------------------------------------------------
    def check_dp(self) -> None:
        if self.dp is None:
            return
        if self.spec.has_extras:  # no noise plan covers them: refuse rather than release them exact
            raise ValueError(stats.EXTRAS_UNDER_DP)
        self.dp_config()

    def dp_config(self) -> stats.DPConfig:
        dp = self.dp or {}
        return stats.DPConfig(
            epsilon=float(dp["epsilon"]),
            mechanism=str(dp.get("mechanism", "laplace")),
            delta=float(dp.get("delta") or 0.0),
        )

    def planned_spends(self) -> list[tuple[float, float, int]]:
        if self.dp is None or self.dp_config().mechanism != "gaussian":
            return []
        return [(stats.gaussian_noise_multiplier(self.spec, self.dp_config()), 1.0, 1)]

    def planned_pure_epsilon(self) -> float:
        if self.dp is None or self.dp_config().mechanism != "laplace":
            return 0.0
        return self.dp_config().epsilon

    def noisy(self, summed: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """As is: `stats.release` adds the families' noise to both passes together (`stats.add_noise`)."""
        return summed

    # --- the site's rows ------------------------------------------------------------------------------
    def variables(self) -> list[str]:
        return [*self.spec.features, *([self.group_column] if self.group_column else [])]

    def read(self, site: SiteInfo) -> Any:
        from clinfed.fl.participant import site_index

        rows = load_cohort(
            site.name,
            site.policy,
            Path(site.root),
            self.spec,
            self.group_column,
            site.num_sites,
            cohort=self.cohort,
            id_column=self.id_column,
            site_number=site_index(site.name),
            omop_cohort=self.config.get("omop_cohort"),
        )
        return {"rows": rows, "info": site}

    def load(self, table, site, min_cell):
        rows, info = table["rows"], table.get("info")
        x, labels, columns = rows.x, rows.labels, rows.columns
        if self.dp is not None:  # DP sums need complete rows: one noisy count then serves every feature
            keep = ~np.isnan(x).any(axis=1)
            x, labels = x[keep], [lab for lab, k in zip(labels, keep, strict=True) if k]
            columns = {c: np.asarray(v, dtype=object)[keep] for c, v in columns.items()}
        masks = group_masks(labels, self.spec, self.group_values)
        return CohortSite(x=x, masks=masks, columns=columns, digest=data_digest(x, labels), info=info)

    # --- the two phases -------------------------------------------------------------------------------
    def size(self, phase):
        return self.spec.pass1_size if phase == "sums" else self.spec.pass2_size

    def _n_means(self) -> int:
        return self.spec.n_groups * self.spec.n_features

    def iterate_size(self, phase):
        if phase == "sums":
            return 0
        return self._n_means() + (0 if self.dp is not None else len(flatten_cells(self._template)))

    def site_local(self, data: CohortSite, phase, iterate):
        clip = self.dp is not None
        if phase == "sums":
            return stats.local_sums(data.x, data.masks, self.spec, clip=clip, columns=data.columns)
        assert iterate is not None
        means = iterate[: self._n_means()].reshape(self.spec.n_groups, self.spec.n_features) * self.spec.scale
        return stats.local_deviations(data.x, data.masks, means, self.spec, clip=clip)

    def vet(self, data: CohortSite, phase, iterate, sites) -> None:
        """Before the deviations leave: the exact release they lead to, against this site's release log."""
        if phase != "deviations" or self.dp is not None:
            return
        assert iterate is not None
        self._admit(data, unflatten_cells(self._template, iterate[self._n_means() :] / CELL_SCALE), sites)

    def vet_release(self, data: CohortSite, result, sites) -> None:
        """The release site records the release itself (the preview already did, unless the cells moved)."""
        if self.dp is not None:
            return
        self._admit(data, cells_of(self.spec, result), sites)

    def _admit(self, data: CohortSite, cells: dict, sites) -> None:
        info = data.info
        if info is None:
            raise SiteRefusal("no site context to find the release log in")
        definition = CohortDefinition.of(self.cohort, list(sites), self.group_column, self.group_values, data.digest)
        ReleaseLog(info.root, info.name).admit(definition, cells, job=info.job_label, run=info.run_id)

    def step(self, summed, phase, min_cell):
        if phase == "sums":
            sums = stats.unpack_sums(summed, self.spec)
            stats.check_contributors(sums.contributors, "pass-1 sum")
            self._sums = sums
            means = np.nan_to_num(sums.means() / self.spec.scale).reshape(-1)
            if self.dp is not None:
                return Step(phase="deviations", iterate=means)
            preview = stats.release(
                sums,
                np.zeros((self.spec.n_groups, self.spec.n_features)),
                self.spec,
                min_cell=min_cell,
                max_bins_percent=self.max_bins_percent,
            )
            cells = flatten_cells(cells_of(self.spec, preview["statistics"])) * CELL_SCALE
            return Step(phase="deviations", iterate=np.concatenate([means, cells]))
        if self._sums is None:
            raise SiteRefusal("asked for the deviations' release before holding a pass-1 sum")
        if stats.contributors(summed, "pass-2 sum") != self._sums.contributors:
            raise SiteRefusal("the pass-2 sum holds another number of sites than the pass-1 sum")
        m2 = stats.unpack_deviations(summed, self.spec)
        dp = self.dp_config() if self.dp is not None else None
        out = stats.release(self._sums, m2, self.spec, min_cell=min_cell, dp=dp, max_bins_percent=self.max_bins_percent)
        sup = out["suppression"]
        return Step(
            result=out["statistics"],
            n=int(self._sums.rows[0]),
            suppressed=(
                f"{len(sup.get('groups_withheld', {}))} group(s) and {sup.get('cells_withheld_total', 0)} "
                "histogram cell(s) withheld: see suppression"
            ),
            extra={"suppression": sup, "dp": out["dp"], "precision": out["precision"]},
        )

    # --- summary.json ---------------------------------------------------------------------------------
    def summary_fields(self, release: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "statistics": release.get(self.block) or {},  # {} when nothing was released, as readers expect
            "cohort": self.cohort,
            "suppression": release.get("suppression") or {},
            "dp": release.get("dp"),
            "precision": release.get("precision"),
        }

    def release_metrics(self, release: Mapping[str, Any]) -> dict[str, Any]:
        sup = release.get("suppression") or {}
        return {
            "groups_released": len(release.get(self.block) or {}),
            "groups_withheld": len(sup.get("groups_withheld", {})),
            "cells_withheld": int(sup.get("cells_withheld_total", 0)),
        }
