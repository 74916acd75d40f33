"""`psi_linkage`: which patients do all sites share? FLARE's DH-PSI, with results kept at the sites.

The protocol is FLARE's own (`nvflare.app_common.psi`: `DhPSIController` / `DhPSIWorkFlow` on the
server, `PSIExecutor` + `DhPSITaskHandler` at the sites, backed by OpenMined's `openmined.psi`
elliptic-curve Diffie-Hellman PSI). What clinfed adds around it, and why:

* :class:`~clinfed.analytics.psi_exact.ExactDhPSITaskHandler`: FLARE's handler, but the server
  role sends a Golomb-compressed set instead of OpenMined's Bloom filter, which reports patients
  who are not in the intersection far more often than the rate FLARE asks for (see that module).

* :class:`ClinfedPSI` (FLARE's `PSI` spec): the identifiers a site brings, from its own CSV
  (``id_column`` of `<data_dir>/data.csv`, the data folder set in the site's `local/resources.json`)
  or, for the bundled demo, from overlapping row ranges of the 569 breast-cancer rows, so the true
  intersection is known (:func:`registry_rows`, :func:`expected_intersection_size`).
* :class:`SiteLocalPSIWriter` (FLARE's `PSIWriter` spec) instead of `FilePSIWriter`: FLARE's writer
  puts the IDs inside the job's workspace, which the simulator wipes and which a later job cannot
  find. Ours writes them to the participant's persistent `local/psi/` (mode 0600), where the
  `cohort_stats` job's ``cohort="intersect"`` reads them. `DhPSITaskHandler` also saves the
  *intermediate* pairwise intersections of the forward pass, so the writer only stages a
  ``<job>.pending`` file; :class:`PSIReportExecutor` promotes it to `intersection.txt` once the
  server says the protocol finished, and reports its size.
* :class:`LinkageController` (extends `DhPSIController`, which writes no summary): after FLARE's
  workflow, it asks every site for the size of what it saved (sizes only, never identifiers) and
  writes summary.json with ``psi.per_site``.

Known limits (FLARE's DH-PSI design): the server learns every site's set size and the sizes of
the intermediate pairwise intersections; sites learn the intersection itself (that is the point).
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.psi.dh_psi.dh_psi_controller import DhPSIController
from nvflare.app_common.psi.psi_executor import PSIExecutor
from nvflare.app_common.psi.psi_spec import PSI
from nvflare.app_common.psi.psi_writer_spec import PSIWriter
from nvflare.app_common.workflows.broadcast_operator import BroadcastAndWait
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from clinfed.audit import AuditLog
from clinfed.errors import SiteDataError, SiteRefusal
from clinfed.fl.participant import SitePolicy, participant_root, site_index
from clinfed.textio import one_line, write_private

BUNDLED_ROWS = 569
PSI_FOLDER = ("local", "psi")
INTERSECTION_FILE = "intersection.txt"
INTERSECTION_META = "intersection.json"
REPORT_TASK = "psi_report"
EMPTY_KEY = "intersection_is_empty"
COMMIT_KEY = "commit"
SITES_KEY = "sites"  # the report task names the sites whose items went into the intersection
MIN_PSI_SITES = 3
PSI_TASK = "PSI"  # FLARE's PSIConst.TASK
SUMMARY_FILE = "summary.json"


# --- identifiers --------------------------------------------------------------------------------------------
def patient_id(row: int) -> str:
    """The bundled demo's identifier for row ``row`` of the 569 (stable across sites and jobs)."""
    return f"bc-{int(row):04d}"


def patient_ids(rows) -> list[str]:
    return [patient_id(r) for r in rows]


def _stride(num_sites: int, n_rows: int) -> int:
    if num_sites < 1:
        raise ValueError(f"num_sites must be at least 1, got {num_sites}")
    return n_rows // (2 * num_sites)


def registry_rows(index: int, num_sites: int, n_rows: int = BUNDLED_ROWS) -> range:
    """Rows [i·w, i·w + L) of the bundled data that demo site ``index`` (0-based) has records of.

    w = n // (2·sites) and L = n − (sites − 1)·w: consecutive sites overlap by L − w rows and all of
    them share the core [(sites − 1)·w, L), so each pairwise intersection is larger than the common
    one (the forward pass really narrows it down) and the true answer is known in advance.
    """
    if not 0 <= index < num_sites:
        raise ValueError(f"site index {index} outside 0..{num_sites - 1}")
    w = _stride(num_sites, n_rows)
    length = n_rows - (num_sites - 1) * w
    return range(index * w, index * w + length)


def expected_intersection_size(num_sites: int, n_rows: int = BUNDLED_ROWS) -> int:
    """|∩ registry_rows| = L − (sites − 1)·w = n − 2·(sites − 1)·w."""
    w = _stride(num_sites, n_rows)
    return n_rows - 2 * (num_sites - 1) * w


def read_registry_csv(site: str, data_dir: str | Path, id_column: str) -> list[str]:
    """A site's identifiers from the ``id_column`` of `<data_dir>/data.csv` (or its only CSV)."""
    folder = Path(data_dir)
    csvs = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    path = folder / "data.csv" if (folder / "data.csv").exists() else (csvs[0] if len(csvs) == 1 else None)
    if path is None:
        raise SiteDataError(f"{site}: no data.csv in {folder}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if id_column not in (reader.fieldnames or []):
            raise SiteDataError(f"{site}: {path} lacks column '{id_column}'")
        ids = [(row[id_column] or "").strip() for row in reader]
    empty = sum(1 for i in ids if not i)
    if empty:
        raise SiteDataError(f"{site}: {path} has {empty} row(s) with an empty '{id_column}'")
    if len(set(ids)) != len(ids):
        raise SiteDataError(f"{site}: {path} has {len(ids) - len(set(ids))} duplicate '{id_column}' value(s)")
    return ids


def site_identifiers(
    site: str, index: int | None, num_sites: int, data_dir: str | None, id_column: str
) -> tuple[list[str], str]:
    """(identifiers, "csv" or "bundled") for one site."""
    if data_dir:
        return read_registry_csv(site, data_dir, id_column), "csv"
    if index is None or not 0 <= index < num_sites:
        raise SiteDataError(f"{site}: no data_dir in local/resources.json and no bundled registry for this name")
    return patient_ids(registry_rows(index, num_sites)), "bundled"


# --- where a site keeps the result ----------------------------------------------------------------------
def psi_folder(root: Path) -> Path:
    return Path(root).joinpath(*PSI_FOLDER)


def _replace_private(path: Path, text: str) -> None:
    """Identifiers are patient data: owner-only from the first byte (`textio.write_private`), and
    replaced atomically (a reader never sees half)."""
    tmp = path.with_name(path.name + ".tmp")
    write_private(tmp, text)
    os.replace(tmp, path)


def read_intersection(root: Path, site: str) -> set[str]:
    """The identifiers this site shares with all others, from its last completed `psi_linkage` run."""
    path = psi_folder(root) / INTERSECTION_FILE
    if not path.exists():
        raise SiteDataError(f"{site}: no PSI result at {path}; run the psi_linkage job first")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


# --- site components -----------------------------------------------------------------------------------
class ClinfedPSI(PSI):
    """FLARE `PSI` spec: the items this site brings to the intersection."""

    def __init__(self, psi_writer_id: str = "psi_writer", num_sites: int = 3, id_column: str = "patient_id"):
        super().__init__(psi_writer_id)
        self.num_sites, self.id_column = num_sites, id_column

    def load_items(self) -> list[str]:
        site = self.fl_ctx.get_identity_name()
        root = participant_root(self.fl_ctx)
        policy = SitePolicy.load(root)
        if self.num_sites < policy.min_sites:
            raise SiteRefusal(
                f"{site}: the job links {self.num_sites} site(s), fewer than this site's min_sites "
                f"{policy.min_sites}: the intersection would tell which of its patients the other site holds"
            )
        ids, source = site_identifiers(site, site_index(site), self.num_sites, policy.data_dir, self.id_column)
        AuditLog(root, site).append("psi_items", job=self.fl_ctx.get_job_id(), site=site, items=len(ids), source=source)
        return ids


class SiteLocalPSIWriter(PSIWriter):
    """FLARE `PSIWriter` spec: stage each intersection the protocol hands this site (see module doc)."""

    def save(self, intersection: list[str], overwrite_existing: bool, fl_ctx: FLContext) -> None:
        path = psi_folder(participant_root(fl_ctx)) / f"{fl_ctx.get_job_id()}.pending"
        _replace_private(path, "\n".join(intersection) + ("\n" if intersection else ""))


class PSIReportExecutor(Executor):
    """Answers ``psi_report``: promote the staged intersection and report its size (never the IDs)."""

    def __init__(self, num_sites: int = 3, id_column: str = "patient_id", job_label: str = "psi_linkage"):
        super().__init__()
        self.num_sites, self.id_column, self.job_label = num_sites, id_column, job_label

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name != REPORT_TASK:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        root = participant_root(fl_ctx)
        folder = psi_folder(root)
        pending = folder / f"{fl_ctx.get_job_id()}.pending"
        try:
            policy = SitePolicy.load(root)
            items, source = site_identifiers(site, site_index(site), self.num_sites, policy.data_dir, self.id_column)
            listed = sorted(set(shareable.get(SITES_KEY) or []))
            if len(listed) < policy.min_sites or site not in listed:
                # A linkage of fewer sites says which of this site's patients one other site holds: nothing
                # is kept (the server states the set; docs/threat-model.md says what that does not stop).
                pending.unlink(missing_ok=True)
                reason = (
                    f"{site}: intersection not saved: the linkage names {len(listed)} site(s) {listed}, fewer than "
                    f"this site's min_sites {policy.min_sites} or without this site"
                )
                return DXO(data_kind=DataKind.PSI, data={"status": "refused", "reason": reason}).to_shareable()
            if not shareable.get(COMMIT_KEY, True):  # an incomplete result must not pass for the linkage
                pending.unlink(missing_ok=True)
                reason = f"{site}: intersection not saved: the protocol did not complete for all sites"
                return DXO(
                    data_kind=DataKind.PSI, data={"status": "ok", "reason": reason, "items": len(items)}
                ).to_shareable()
            if shareable.get(EMPTY_KEY):  # the server saw an empty pairwise intersection
                ids = []
                _replace_private(folder / INTERSECTION_FILE, "")
                pending.unlink(missing_ok=True)
            elif not pending.exists():
                raise RuntimeError(f"{site}: the protocol left no intersection for this job")
            else:
                ids = [line for line in pending.read_text().splitlines() if line]
                os.replace(pending, folder / INTERSECTION_FILE)
            meta = {"job": self.job_label, "job_id": fl_ctx.get_job_id(), "size": len(ids), "source": source}
            _replace_private(folder / INTERSECTION_META, json.dumps(meta, indent=2))
            AuditLog(root, site).append("psi_result", job=self.job_label, site=site, intersection_size=len(ids))
            data = {"status": "ok", "reason": "", "items": len(items), "intersection_size": len(ids), "source": source}
        except Exception as exc:  # reported to the server by name, the job's summary says which site
            data = {"status": "failed", "reason": one_line(exc, site)}
        return DXO(data_kind=DataKind.PSI, data=data).to_shareable()


# --- server side -----------------------------------------------------------------------------------------
class LinkageController(DhPSIController):
    """FLARE's `DhPSIController`, then a size report from every site, then summary.json."""

    def __init__(self, num_sites: int = 3, job_label: str = "psi_linkage"):
        super().__init__()
        self.num_sites, self.job_label = num_sites, job_label

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext):
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        audit = AuditLog(participant_root(fl_ctx, "server"), "server")
        audit.append("job_start", job=self.job_label, sites=sites)
        error = ""
        try:
            super().control_flow(abort_signal, fl_ctx)
        except Exception as exc:  # FLARE's workflow raises RuntimeError with its own text
            error = one_line(exc)
        if abort_signal.triggered and not error:
            error = "the PSI workflow was aborted (a site failed; see its log)"
        forward = dict(self.psi_workflow.forward_processed)
        empty = bool(forward) and min(forward.values()) == 0 and not abort_signal.triggered
        if empty:
            # FLARE's DhPSITaskHandler takes an empty pairwise result for "no result yet" and goes on
            # with the site's full set, so its own consistency check then fails. One empty pairwise
            # intersection already proves the overall one empty: that is the answer, not an error.
            self.log_warning(fl_ctx, f"an empty pairwise intersection ({forward}): the intersection is empty")
            error = ""
        took_part = {s.name for s in self.psi_workflow.ordered_sites}
        missing = [s for s in sites if s not in took_part]
        if missing and not error:  # FLARE's workflow silently leaves out a site that sent no items
            error = f"{', '.join(missing)} brought no identifiers, so no intersection of all sites exists"
        reports: dict = {}
        if not abort_signal.triggered:  # commit only a complete result; always collect the sites' reasons
            task_input = Shareable()
            task_input[EMPTY_KEY] = empty
            task_input[COMMIT_KEY] = not error
            task_input[SITES_KEY] = sorted(took_part)
            op = BroadcastAndWait(fl_ctx, self)
            reports = op.broadcast_and_wait(
                task_name=REPORT_TASK,
                task_input=task_input,
                fl_ctx=fl_ctx,
                targets=sites,
                min_responses=len(sites),
                abort_signal=abort_signal,
            )
        protocol = {**self.psi_workflow.forward_processed, **self.psi_workflow.backward_processed}
        summary = self._summary(sites, {s: d.data for s, d in (reports or {}).items()}, protocol, error)
        audit.append("job_end", job=self.job_label, intersection_size=summary["psi"]["intersection_size"])
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        self.log_info(fl_ctx, f"summary written to {run_dir / SUMMARY_FILE}")
        if error:  # reported in summary.json, as `clinfed` reports every site-level failure, not a crash
            self.log_error(fl_ctx, f"psi_linkage: no intersection of all sites: {error}")

    def _summary(self, sites: list[str], reports: dict[str, dict], protocol: dict[str, int], error: str) -> dict:
        entries: dict[str, dict] = {}
        for site in sites:
            rep = reports.get(site) or {"status": "failed", "reason": f"{site}: no report (aborted, or it died)"}
            entries[site] = {
                "status": rep.get("status", "failed"),
                "reason": rep.get("reason", ""),
                "metrics": {k: rep[k] for k in ("items", "intersection_size") if k in rep},
                "epsilon": 0.0,
                "bytes_sent": 0,  # DH-PSI messages travel inside FLARE's workflow; not measured here
            }
        per_site = {
            s: int(e["metrics"]["intersection_size"]) for s, e in entries.items() if "intersection_size" in e["metrics"]
        }
        sizes = set(per_site.values())
        all_ok = len(per_site) == len(sites) and not error
        bundled = all_ok and all(reports[s].get("source") == "bundled" for s in sites)
        size = next(iter(sizes)) if all_ok and len(sizes) == 1 else None
        failed = [e["reason"] for e in entries.values() if e["status"] != "ok"]
        disagree = [f"sites disagree on the intersection size: {per_site}"] if len(sizes) > 1 else []
        reason = "; ".join(r for r in [error, *failed, *disagree] if r)
        return {
            "job": self.job_label,
            "sites": sites,
            "rounds_completed": 1 if all_ok else 0,
            "encrypted": True,  # DH-PSI: only blinded (exponentiated) identifiers leave a site
            "rounds": [{"round": 0, "sites": entries}],
            "final": {
                "status": "ok" if size is not None else "failed",
                "reason": reason,
                "metrics": {} if size is None else {"intersection_size": size},
                "primary_metric": "intersection_size",
                "per_site": {s: {"protocol_intersection_size": protocol.get(s)} for s in sites},
            },
            "privacy": {},
            "psi": {
                "intersection_size": size,
                "expected_intersection_size": expected_intersection_size(self.num_sites) if bundled else None,
                "per_site": per_site,
            },
        }


# --- the recipe -------------------------------------------------------------------------------------------
class LinkageRecipe(Recipe):
    """FLARE's `DhPSIRecipe` wiring, with clinfed's PSI items, site-local writer, size report and summary."""

    def __init__(self, name: str, num_sites: int, id_column: str = "patient_id"):
        if num_sites < MIN_PSI_SITES:  # every site also refuses below its own min_sites (never under 3)
            raise ValueError(
                f"psi_linkage needs at least {MIN_PSI_SITES} sites, got {num_sites}: the intersection of two sites "
                "tells each which of its patients the other holds"
            )
        # The handler imports openmined.psi at import time; only this job needs it.
        from clinfed.analytics.psi_exact import ExactDhPSITaskHandler

        job = FedJob(name=name, min_clients=num_sites)
        job.set_app_packages(["clinfed"])
        job.to_server(LinkageController(num_sites=num_sites, job_label=name), id="controller")
        job.to_clients(PSIExecutor(psi_algo_id="dh_psi"), id="psi_executor", tasks=[PSI_TASK])
        job.to_clients(
            PSIReportExecutor(num_sites=num_sites, id_column=id_column, job_label=name),
            id="report_executor",
            tasks=[REPORT_TASK],
        )
        job.to_clients(ExactDhPSITaskHandler(local_psi_id="local_psi"), id="dh_psi")
        job.to_clients(ClinfedPSI(psi_writer_id="psi_writer", num_sites=num_sites, id_column=id_column), id="local_psi")
        job.to_clients(SiteLocalPSIWriter(), id="psi_writer")
        self.num_sites = num_sites
        super().__init__(job)
