"""The server side of federated averaging when the server must learn nothing about the model.

`SecureFedAvg` is a FLARE `ModelController` (the same base as FLARE's `FedAvg`), so sampling,
task dispatch, timeouts and result collection are FLARE's. What FLARE's FedAvg cannot do is hold the
global model as ciphertext: it averages plaintext arrays. Here the controller only validates and
routes; the arithmetic lives in `clinfed.he.aggregation` (encrypted sum) or its plaintext twin.

With encryption on, the server loads a context without a secret key (`load_server_context` refuses
one), keeps the global model only as the summed ciphertexts plus the summed weight, and persists
only that. Each round every site's outcome ("ok", "refused", "failed" with a reason) is recorded;
an invalid update is excluded before it touches the sum, and the round completes if at least
`min_clients` valid updates arrived, otherwise the previous global model is kept.
At the end a `validate` task scores the final global model on each site's held-out data and the
server writes `summary.json` into its run folder (`clinfed.fl.summary`).

Privacy floors in code, not in the job: a round's sum replaces the global model only with at least
`MIN_CONTRIBUTORS` (3) valid updates, whatever `min_clients` a job config says (the sites also
refuse to decrypt a smaller sum: the count is inside the ciphertexts). Before round 0 every site is
asked to admit the job as a whole (`admit` task: its own policy and remaining budget decide); only
sites that accept are sent training tasks, and summary.json records `admission`. Every message to a
site carries the server's audit-chain head and every reply the site's; each side records the other's
(`anchor`), so no single party can rewrite its own audit history unnoticed.

Dense encrypted updates use the compact format (`clinfed.he.compact`, `he_format="compact"`, the
default): after admission the server fixes the job's `CompactSpec` (its public `value_bound`, the
admitted sites as `max_sites`, pooled) and sends it with every train task together with the admitted
sites' total weight, which each site turns into its share. The server only checks that every upload
was made under that spec and adds; `he_format="real"` keeps the real-valued CKKS path.

With `compression` the sites send k values at coordinates they agree on among themselves; the
server still only adds, and checks that every update it adds comes with the same keyed digest of
those coordinates (the majority's: a site that disagrees would corrupt the sum). The sum it returns
is tagged with its round, the round it follows and its contributors; the sites, not the server, hold
the model (see `clinfed.fl.compression.CompressedSite`).

The server is not trusted with the sum either (`clinfed.fl.secagg`): every encrypted upload is masked
for the round's member set, so the server can only add exactly the members' uploads, once each. When
members drop out, the survivors upload again for the smaller set (`secagg_remask`); when every member's
upload is in, each reveals its self-mask seed (`secagg_reveal`), and the sum goes out with those
signed reveals, which the sites check and use to unmask it before decrypting.
"""

from __future__ import annotations

import math
import secrets
import time
from collections import Counter

import numpy as np
from nvflare.apis.fl_constant import ReturnCode
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.workflows.model_controller import ModelController

from clinfed.audit import AuditLog
from clinfed.fl import checkpoint, payload, streaming
from clinfed.fl.participant import participant_root, server_context
from clinfed.fl.roc_validation import ROC_TASK, federated_roc
from clinfed.fl.secagg import (
    HELLO_KEY,
    REMASK_TASK,
    REVEAL_TASK,
    SECAGG_KEY,
    SUM_KEY,
    ServerRoster,
    collect_reveals,
    complete_round,
    result_site,
    sum_info,
)
from clinfed.fl.summary import training_summary, write_summary
from clinfed.he.aggregation import MIN_CONTRIBUTORS
from clinfed.sysinfo import current_rss_mb, peak_rss_mb, release_free_memory
from clinfed.textio import one_line


class SecureFedAvg(ModelController):
    def __init__(
        self,
        num_rounds: int = 5,
        min_clients: int = 1,
        encrypted: bool = True,
        job_label: str = "",
        primary_metric: str = "auc",
        task_timeout: int = 0,
        straggler_wait: int = 60,
        resume: bool = True,
        extra_summary: dict | None = None,
        submission: str = "",
        compression: float = 0.0,
        he_format: str = "compact",
        value_bound: float = 16.0,
    ):
        """
        Args:
            num_rounds: training rounds.
            min_clients: valid updates a round needs to replace the global model.
            encrypted: aggregate CKKS ciphertexts (default) or plaintext FedAvg (comparison only).
            job_label: job name for the audit log and summary.
            primary_metric: the metric summarising utility in `final` ("auc", "dice").
            task_timeout: seconds any one task may take (0: derived, see `_deadline`: never unlimited).
            straggler_wait: once `min_clients` answered, seconds to wait for the others before the
                round closes without them (a dead site must not stall the federation).
            resume: continue an unfinished earlier run of this same submission from its last round
                (see `clinfed.fl.checkpoint`).
            extra_summary: fixed fields added to summary.json.
            submission: random id of this submission (drawn by the recipe); keys the resume point.
                Without one, the FLARE job id is used, so nothing resumes across submissions.
            compression: the fraction of coordinates the sites send (0: dense updates); recorded in
                summary.json and used to expect one index digest per round.
            he_format: "compact" (dense updates on the grid tied to the sites' DP noise, ~1.9 B/param
                for large models, `CompactSpec.for_noise`; without DP noise, the fixed grid),
                "compact-fixed" (the fixed grid, ~3.75 B/param) or "real" (the real-valued CKKS path,
                16 B/param). Compressed updates follow it: either compact format sends them in
                `clinfed.he.truncated` on the fixed grid (3.75 B per value sent), "real" one real-valued
                ciphertext.
            value_bound: the public bound on |model value| of the fixed grid: values beyond it are
                clipped at the site; the quantum is value_bound / 2^20.
        """
        super().__init__()
        self._error_codes: dict[str, str] = {}
        self.resume, self.submission = resume, submission
        self.straggler_wait = straggler_wait
        # FedJob serialises attributes named like the arguments: keep min_clients as given; the floor
        # is applied where it is used (_floor), so an edited job config cannot lower it either.
        self.num_rounds, self.min_clients, self.encrypted = num_rounds, min_clients, encrypted
        self.job_label, self.primary_metric, self.task_timeout = job_label, primary_metric, task_timeout
        self.extra_summary = dict(extra_summary or {})
        self.compression = compression
        self.he_format, self.value_bound = he_format, value_bound
        self._spec = None  # the job's CompactSpec once the sites are admitted (compact format only)
        self._roster = ServerRoster()  # the admitted sites' signed secure-aggregation keys
        self._admitted_weight = 0.0

    # --- setup ---------------------------------------------------------------------------------
    def _setup(self) -> None:
        self.root = participant_root(self.fl_ctx, "server")
        self._spool_dir = self.root / "spool"  # streamed uploads land here, one at a time (fl.streaming)
        self._spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.audit = AuditLog(self.root, "server")
        self.job = self.job_label or self.fl_ctx.get_job_id()
        self._submission = self.submission or self.fl_ctx.get_job_id()
        self.ctx, self.fingerprint = None, ""
        if self.encrypted:
            self.ctx, self.fingerprint = server_context(self.root)

    def _new_sum(self, layout_json: str | None):
        """A fresh accumulator that holds every site to the federation's model layout."""
        from clinfed.he.aggregation import EncryptedSum, PlainWeightedSum
        from clinfed.he.packing import layout_from_json

        layout = layout_from_json(layout_json) if layout_json else None
        if self._spec is not None and self.compression:  # k values in c0's first coefficients
            from clinfed.he.truncated import TruncatedSum

            return TruncatedSum(self.ctx, self._spec, self.fingerprint, size=layout.size if layout else None)
        if self._spec is not None:
            from clinfed.he.compact import CompactSum

            return CompactSum(self.ctx, self._spec, self.fingerprint, size=layout.size if layout else None)
        if self.encrypted:
            return EncryptedSum(self.ctx, self.fingerprint, size=layout.size if layout else None)
        return PlainWeightedSum(reference=layout)

    def _reference_layout(self, results: list[FLModel]) -> str | None:
        """The model layout every update must have: the global model's once there is one, else the
        layout most sites sent (so one misconfigured site cannot set the standard for the others)."""
        if self._layout is not None:
            return self._layout
        layouts = [layout_json(r.params) for r in results if (r.meta or {}).get("status") == "ok" and r.params]
        layouts = [lj for lj in layouts if lj]
        return Counter(layouts).most_common(1)[0][0] if layouts else None

    def _accept_train_result(self, client_name, result, fl_ctx, is_unknown_task: bool = False) -> bool:
        """Remember why a site's result was not usable (e.g. its privacy filter raised UNSAFE_JOB),
        so the summary can say "refused by its policy" rather than "no result"."""
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            self._error_codes[client_name] = rc
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)

    # --- one round -----------------------------------------------------------------------------
    def _aggregate(self, round_num: int, results: list[FLModel], targets: list[str]) -> tuple[dict, FLModel | None]:
        entries, acc, accepted, layout, digest = self._add_uploads(round_num, results, targets)
        reveals = None
        if self.encrypted and len(accepted) >= self._floor:
            acc, accepted, reveals = self._unmask(round_num, entries, acc, accepted, targets, layout)
        if len(accepted) < self._floor:
            self.warning(
                f"round {round_num}: only {len(accepted)} valid updates (< {self._floor}, and never fewer than "
                f"{MIN_CONTRIBUTORS}); keeping the previous global model"
            )
            self.audit.append("round_withheld", job=self.job, round=round_num, valid=len(accepted), needed=self._floor)
            return entries, None
        new_global = self._global_from(acc, layout)
        if reveals is not None:
            new_global.meta[SUM_KEY] = sum_info(round_num, "train", accepted, reveals)
        if self.compression:
            previous = (self._global.meta or {}).get(payload.SUM_ROUND_KEY, -1) if self._global is not None else -1
            new_global.meta.update(
                {
                    payload.SUM_ROUND_KEY: round_num,
                    payload.AFTER_ROUND_KEY: previous,
                    payload.CONTRIBUTORS_KEY: sorted(accepted),
                    payload.DIGEST_KEY: digest,
                }
            )
        self._layout = layout
        self.audit.append(
            "aggregation", job=self.job, round=round_num, sites=sorted(accepted), encrypted=self.encrypted
        )
        return entries, new_global

    def _secagg_task(self, round_num: int, members: list[str], params: dict | None = None) -> FLModel:
        """A re-run or reveal task: the member set and the roster, no model."""
        meta = {SECAGG_KEY: self._roster.task(round_num, "train", members)}
        return self._stamped(FLModel(params=params or {}, meta=meta, current_round=round_num))

    def _unmask(
        self, round_num: int, entries: dict, acc, accepted: list[str], targets: list[str], layout: str | None
    ) -> tuple[object, list[str], dict | None]:
        """Secure aggregation's end of a round (`clinfed.fl.secagg.complete_round`): re-runs while members
        are missing, then every member's reveal. (sum, its members, reveals); members [] when the round
        cannot be unmasked (too few survivors, or a member that died while revealing)."""

        def rerun(members: list[str]) -> tuple[object, list[str]]:
            dropped = sorted(set(entries) - set(members))
            self.info(f"round {round_num}: the survivors {members} upload again for that set (dropped: {dropped})")
            self.audit.append("secagg_rerun", job=self.job, round=round_num, members=members)
            results = self._collect(REMASK_TASK, self._secagg_task(round_num, members), members)
            sub, new_acc, ok, _, _ = self._add_uploads(round_num, results, members, layout)
            for site, entry in sub.items():
                if entry["status"] == "ok":
                    entries[site]["bytes_sent"] += entry["bytes_sent"]
                else:
                    entries[site].update(status=entry["status"], reason=entry["reason"])
            return new_acc, ok

        def reveal(members: list[str]) -> dict[str, dict]:
            results = self._collect(REVEAL_TASK, self._secagg_task(round_num, members), members, wait_for_all=True)
            reveals = collect_reveals(results, members, entries)
            for result in results:
                payload.record_anchor(
                    self.audit, result.meta, job=self.job, round_num=round_num, peer=result_site(result)
                )
            return reveals

        done = complete_round(sorted(targets), acc, accepted, self._floor, rerun, reveal)
        if done.reason:
            self.warning(f"round {round_num}: {done.reason}")
        return done.acc, done.members, done.reveals

    def _add_uploads(
        self, round_num: int, results: list[FLModel], targets: list[str], layout: str | None = None
    ) -> tuple[dict, object, list[str], str | None, str | None]:
        """Vet and add every upload: (entries, the running sum, the sites in it, layout, index digest)."""
        entries: dict[str, dict] = {}
        layout = layout or self._reference_layout(results)
        digest = self._reference_digest(results)
        acc = self._new_sum(layout)
        for result in results:
            site = result.meta.get("client_name", "?")
            meta = result.meta or {}
            payload.record_anchor(self.audit, meta, job=self.job, round_num=round_num, peer=site)
            status = meta.get("status", "failed")
            entry = {
                "status": status,
                "reason": meta.get("reason", ""),
                "metrics": meta.get("metrics", {}),
                "epsilon": float(meta.get("epsilon", 0.0) or 0.0),
                "bytes_sent": int(meta.get("bytes_sent", 0) or 0),
            }
            if isinstance(meta.get("clamped_values"), int) and status == "ok":  # noise-tied grid only
                entry["clamped_values"] = int(meta["clamped_values"])
            self._record_privacy(site, meta)
            if status == "ok":
                params = result.params or {}
                try:
                    if streaming.is_streamed(params):  # pulled now, one site after the other (see fl.streaming)
                        params, entry["stream"] = streaming.receive(
                            self.fl_ctx.get_engine().get_cell(), params, site, self._spool_dir, self.abort_signal
                        )
                    payload.log_update(
                        self.audit, "update_received", params, job=self.job, round_num=round_num, site=site
                    )
                    if layout_json(params) != layout:
                        raise ValueError(f"{site}: model layout differs from the federation's (another model version?)")
                    if self.compression and meta.get(payload.DIGEST_KEY) != digest:
                        raise ValueError(f"{site}: sent other coordinates than the other sites this round; excluded")
                    self._note_compression(meta)
                    self._accept(acc, site, params, meta)
                except ValueError as exc:
                    reason = str(exc).splitlines()[0]
                    entry.update(status="failed", reason=reason if reason.startswith(site) else f"{site}: {reason}")
                finally:
                    streaming.release(params)
                    result.params = None  # the round's uploads go as soon as they are added
            if entry["status"] != "ok":
                self.warning(entry["reason"] or f"{site}: {entry['status']}")
                self.audit.append(entry["status"], job=self.job, round=round_num, site=site, reason=entry["reason"])
            entries[site] = entry
        for site in targets:
            if site not in entries:
                rc = self._error_codes.pop(site, None)
                blocked = rc == ReturnCode.UNSAFE_JOB
                entries[site] = {
                    "status": "refused" if blocked else "failed",
                    "reason": f"{site}: its privacy policy blocked this job's result"
                    if blocked
                    else f"{site}: " + (f"returned error {rc}" if rc else "no result this round (timed out or died)"),
                    "metrics": {},
                    "epsilon": self._privacy.get(site, {}).get("epsilon", 0.0),
                    "bytes_sent": 0,
                }
                self.audit.append(
                    entries[site]["status"], job=self.job, round=round_num, site=site, reason=entries[site]["reason"]
                )
        self._error_codes.clear()
        accepted = [s for s, e in entries.items() if e["status"] == "ok"]
        return entries, acc, accepted, layout, digest

    def _reference_digest(self, results: list[FLModel]) -> str | None:
        """The index digest most sites sent this round (compressed runs): the coordinates of the sum."""
        if not self.compression:
            return None
        digests = [(r.meta or {}).get(payload.DIGEST_KEY) for r in results if (r.meta or {}).get("status") == "ok"]
        digests = [d for d in digests if isinstance(d, str) and d]
        return Counter(digests).most_common(1)[0][0] if digests else None

    def _note_compression(self, meta: dict) -> None:
        """What summary.json says of the compressed updates (k, model size, ciphertexts per upload)."""
        info = meta.get("compression")
        if self.compression and isinstance(info, dict) and not self._compression:
            keys = ("k", "k_nominal", "size", "ciphertexts", "dense_ciphertexts", "dense_upload_bytes")
            self._compression = {k: int(info[k]) for k in keys if isinstance(info.get(k), int | float)}
            if info.get("format") in ("truncated", "real"):
                self._compression["format"] = info["format"]

    def _accept(self, acc, site: str, params: dict, meta: dict) -> None:
        weight = float(meta.get("weight", 0.0) or 0.0)
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"{site}: aggregation weight {weight!r} is not a positive number")
        if self.encrypted:
            if not payload.is_encrypted(params):
                raise ValueError(f"{site}: sent a plaintext update to an encrypted job")
            if self._spec is not None:  # the spec the site quantised with must be the job's
                spec = str(params.get(payload.COMPACT_KEY) or "")
                acc.add(site, params[payload.CKKS_KEY], weight, params.get(payload.FINGERPRINT_KEY, ""), spec)
            else:
                acc.add(site, params[payload.CKKS_KEY], weight, params.get(payload.FINGERPRINT_KEY, ""))
        else:
            if payload.is_encrypted(params):
                raise ValueError(f"{site}: sent ciphertexts to a plaintext job")
            acc.add(site, {k: np.asarray(v) for k, v in params.items()}, weight)

    def _global_from(self, acc, layout: str | None) -> FLModel:
        if self.encrypted:
            # serialised straight to a spool: the parsed running sum is all the server holds in memory;
            # a sum small enough to ride in one message comes back into memory
            spool = streaming.Spool(self._spool_dir)
            cts, total, _ = acc.result(into=spool)
            if not streaming.worth_streaming(spool):
                cts = streaming.into_memory(spool)
            spec = self._spec.to_json() if self._spec is not None else None
            return FLModel(
                params=payload.encrypted_params(cts, layout, self.fingerprint, spec), meta={"total_weight": total}
            )
        avg, total, _ = acc.result()
        return FLModel(params=avg, meta={"total_weight": total})

    def _replace_global(self, model: FLModel | None) -> None:
        """A new global model: the old one's stream ends first, then its spool is deleted."""
        old = self._global
        if old is not None and old is not model:
            streaming.withdraw(getattr(self, "_last_offer", None))
            self._last_offer = None
            streaming.release(old.params)
        if model is not None:
            self._global = model

    def _record_privacy(self, site: str, meta: dict) -> None:
        keys = ("epsilon", "delta", "accountant", "budget", "history", "site_total_epsilon", "policy_override")
        self._privacy[site] = {k: meta[k] for k in keys if k in meta} or self._privacy.get(site, {})

    @property
    def _floor(self) -> int:
        return max(int(self.min_clients or 0), MIN_CONTRIBUTORS)

    # --- persistence (clinfed.fl.checkpoint) -------------------------------------------------------
    def _save_state(self, next_round: int) -> None:
        """After every round: the global model (run folder) and this submission's resume point."""
        blob = self._checkpoint_path.with_suffix(checkpoint.CIPHERTEXT_SUFFIX)
        doc = checkpoint.model_doc(self._global, self.encrypted, blob) if self._global is not None else None
        if self._global is not None:
            checkpoint.save_global_model(self.get_run_dir(), self._global, self.encrypted, next_round - 1)
        state = {
            "job": self.job,
            "submission": self._submission,
            "next_round": next_round,
            "completed": self._completed,
            "rounds": self._rounds,
            "privacy": self._privacy,
            "admission": self._admission,
            "sites": sorted(self._sites),
            "layout": self._layout,
            "encrypted": self.encrypted,
            "global": doc,
            "run_key": self._run_key,
        }
        checkpoint.save_state(self._checkpoint_path, state)

    def _load_state(self) -> int:
        """Resume point of this submission's unfinished earlier run, if any; returns the round to start at."""
        state = checkpoint.load_state(self._checkpoint_path, self.encrypted, self.num_rounds) if self.resume else None
        if state is None:
            return 0
        self._completed, self._rounds = state["completed"], state["rounds"]
        self._privacy, self._sites, self._layout = state["privacy"], set(state["sites"]), state["layout"]
        if state.get("global"):  # ciphertexts back into a spool: the sum goes out as a stream anyway
            spool = streaming.Spool(self._spool_dir) if self.encrypted else None
            self._global = checkpoint.model_from_doc(state["global"], self._checkpoint_path.parent, spool)
            if spool is not None and not streaming.worth_streaming(spool):
                self._global.params[payload.CKKS_KEY] = streaming.into_memory(spool)
        self._run_key = state.get("run_key", self._run_key)
        self.info(f"resuming {self.job} at round {state['next_round']} from {self._checkpoint_path}")
        self.audit.append("job_resumed", job=self.job, round=state["next_round"], submission=self._submission)
        return int(state["next_round"])

    # --- the workflow --------------------------------------------------------------------------
    def run(self) -> None:
        self._setup()
        self._privacy: dict[str, dict] = {}
        self._admission: dict[str, dict] = {}
        self._global: FLModel | None = None
        self._layout: str | None = None
        self._rounds: list[dict] = []
        self._completed = 0
        self._compression: dict = {}
        self._sites: set[str] = set()
        self._checkpoint_path = checkpoint.checkpoint_path(self.root, self.job, self._submission)
        self.audit.append(
            "job_start", job=self.job, encrypted=self.encrypted, rounds=self.num_rounds, submission=self._submission
        )
        # A run key of its own for every run (FLARE's simulator names every job "simulate_job"); a
        # resumed run takes its first run's key back from the resume point.
        self._run_key = f"{self.fl_ctx.get_job_id()}-{secrets.token_hex(6)}"
        start = self._load_state()
        admitted = self._admit(self.sample_clients(), start)
        self._spec = self._compact_spec(admitted)
        if len(admitted) < self._floor:
            self.warning(f"only {len(admitted)} site(s) admitted the job (< {self._floor}); no round can be aggregated")
            self.audit.append("job_not_admitted", job=self.job, admitted=sorted(admitted), needed=self._floor)
        else:
            for round_num in range(start, self.num_rounds):
                if self.abort_signal.triggered:
                    break
                self._sites.update(admitted)
                outgoing = self._global or FLModel(params={})
                outgoing.current_round, outgoing.total_rounds = round_num, self.num_rounds
                if self._spec is not None:  # what each site quantises with, and its share's denominator
                    outgoing.meta[payload.COMPACT_KEY] = self._spec.to_json()
                    outgoing.meta[payload.ADMITTED_WEIGHT_KEY] = self._admitted_weight
                if self.encrypted:  # the member set this round's uploads are masked for, and their keys
                    outgoing.meta[SECAGG_KEY] = self._roster.task(round_num, "train", admitted)
                self.info(f"round {round_num}: sending to {admitted}")
                results = self._collect("train", self._stamped(outgoing), admitted)
                started = time.monotonic()
                entries, new_global = self._aggregate(round_num, results, admitted)
                aggregate_seconds = time.monotonic() - started
                del results
                release_free_memory()  # the round's uploads back to the OS before RSS is read (see sysinfo)
                self._rounds.append(
                    {
                        "round": round_num,
                        "sites": entries,
                        "server_rss_mb": current_rss_mb(),
                        "server_peak_rss_mb": peak_rss_mb(),
                        "aggregate_seconds": round(aggregate_seconds, 3),  # pulling, vetting and adding the uploads
                    }
                )
                if new_global is not None:
                    self._replace_global(new_global)
                    self._completed += 1
                self._save_state(round_num + 1)
        final = self._final_validation(sorted(self._sites))
        roc = self._pooled_roc(sorted(final["per_site"]))
        self._replace_global(None)  # the last stream ends, its spool goes
        self.audit.append("job_end", job=self.job, rounds_completed=self._completed)
        summary = training_summary(
            job=self.job,
            sites=sorted(self._sites | set(self._admission)),
            completed=self._completed,
            encrypted=self.encrypted,
            rounds=self._rounds,
            final=final,
            privacy=self._privacy,
            admission=self._admission,
            resumed_at=start,
            submission=self._submission,
            extra={**self.extra_summary, "he_format": self._format_block(), "roc": roc},
            compression=compression_block(self.compression, self._compression, self._rounds),
        )
        path = write_summary(self.get_run_dir(), summary)
        self.info(f"summary written to {path}")
        self._checkpoint_path.unlink(missing_ok=True)
        self._checkpoint_path.with_suffix(checkpoint.CIPHERTEXT_SUFFIX).unlink(missing_ok=True)

    def _compact_spec(self, admitted: list[str]):
        """The job's CompactSpec (None: the real-valued path): pooled over the admitted sites, whose
        weights (sample counts, public as in FLARE's FedAvg) sum to the shares' denominator. "compact"
        ties the grid to the smallest update noise std the admitted sites state (the finest grid any
        site's noise asks for, `CompactSpec.for_noise`); with no DP noise at some site, with
        "compact-fixed", or for compressed updates (`clinfed.he.truncated`), it is the fixed grid on the
        public `value_bound`."""
        if not (self.encrypted and self.he_format in ("compact", "compact-fixed") and admitted):
            return None
        from clinfed.he.compact import GRID_RANGE_STD, CompactSpec

        weights = [self._admission.get(s, {}).get("weight") for s in admitted]
        self._admitted_weight = float(sum(w for w in weights if isinstance(w, int | float) and w > 0))
        sites = max(len(admitted), MIN_CONTRIBUTORS)
        noise = [self._admission.get(s, {}).get("update_noise_std") for s in admitted]
        tied = self.he_format == "compact" and not self.compression  # truncated updates keep the fixed grid
        if tied and all(isinstance(n, int | float) and 0 < n < math.inf for n in noise):
            try:
                # the finest noise sets δ; the range must still hold ±8σ of the noisiest site's change
                return CompactSpec.for_noise(min(noise), sites, range_std=GRID_RANGE_STD * max(noise) / min(noise))
            except ValueError as exc:
                self.warning(f"noise-tied grid unavailable ({one_line(exc)}); using the fixed grid")
        return CompactSpec(float(self.value_bound), sites, pooled=True)

    def _format_block(self) -> dict | None:
        """summary.json's `he_format`: the wire format of the updates and its public parameters."""
        if not self.encrypted:
            return None
        if self._spec is None:
            return {"format": "real"}
        sent = mean_bytes_sent(self._rounds)
        size = 0
        if self._layout:
            from clinfed.he.packing import layout_from_json

            size = layout_from_json(self._layout).size
        if self.compression:  # the layout is the k values sent; bytes are per parameter of the model
            size = int(self._compression.get("size") or 0)
        block = {
            "format": "truncated" if self.compression else "compact",
            "grid": "noise" if self._spec.stochastic else "fixed",
            "value_bound": self._spec.value_bound,
            "max_sites": self._spec.max_sites,
            "quantum": self._spec.quantum,
            "fields": f"{self._spec.params.fields}x{self._spec.params.field_bits}",
            "upload_bytes_per_param": round(sent / size, 3) if sent is not None and size else None,
        }
        if self._spec.stochastic:
            block["clamped_values"] = sum(
                int(e.get("clamped_values", 0)) for r in self._rounds for e in r["sites"].values()
            )
        return block

    def _stamped(self, model: FLModel) -> FLModel:
        """The outgoing message with the run key and the server's audit-chain head."""
        model.meta["run_key"] = self._run_key
        model.meta[payload.AUDIT_HEAD_KEY] = list(self.audit.head)
        return model

    def _admit(self, targets: list[str], start: int) -> list[str]:
        """Ask every site to accept or refuse the whole job (its policy and remaining budget decide)."""
        request = self._stamped(FLModel(params={}, current_round=start, total_rounds=self.num_rounds))
        request.meta[payload.ANCHORS_KEY] = payload.peer_anchors(self.audit, targets)  # issue 23: rollback check
        results = self.broadcast_model(
            task_name=payload.ADMIT_TASK,
            data=request,
            targets=targets,
            min_responses=min(self._floor, len(targets)),
            timeout=self._deadline(payload.ADMIT_TASK),
            wait_time_after_min_received=self.straggler_wait,  # a dead site must not stall admission
        )
        for result in results:
            site = result.meta.get("client_name", "?")
            meta = result.meta or {}
            payload.record_anchor(self.audit, meta, job=self.job, round_num=start, peer=site)
            if meta.get("status") == "accepted" and self.encrypted and not self._roster.add(site, meta.get(HELLO_KEY)):
                meta = {"status": "refused", "reason": f"{site}: sent no signed secure-aggregation key"}
            if meta.get("status") == "accepted":
                entry = {"status": "accepted", "reason": "", "planned_epsilon": meta.get("planned_epsilon")}
                if isinstance(meta.get("weight"), int | float):
                    entry["weight"] = float(meta["weight"])  # the site's sample weight (public, as in FedAvg)
                if isinstance(meta.get("update_noise_std"), int | float):
                    entry["update_noise_std"] = float(meta["update_noise_std"])  # the grid is cut to it
            else:
                reason = meta.get("reason") or f"{site}: {meta.get('status', 'no answer')}"
                entry = {"status": "refused", "reason": reason}
            self._admission[site] = entry
            self._record_privacy(site, meta)
            self.audit.append("admission", job=self.job, site=site, status=entry["status"], reason=entry["reason"])
        for site in targets:
            if site not in self._admission:
                self._admission[site] = {"status": "refused", "reason": f"{site}: no answer to the admission request"}
        return [s for s in targets if self._admission[s]["status"] == "accepted"]

    def _collect(self, task_name: str, model: FLModel, targets: list[str], wait_for_all: bool = False) -> list[FLModel]:
        """Send a task and wait for the floor's answers, then `straggler_wait` more for the rest:
        a dead or slow site must not stall the federation. An encrypted global model goes as a
        stream reference the sites pull from (see fl.streaming), not inside every task message."""
        started = time.monotonic()
        results = self.broadcast_model(
            task_name=task_name,
            data=self._streamed(model, targets),
            targets=targets,
            min_responses=len(targets) if wait_for_all else min(self._floor, len(targets)),
            timeout=self._deadline(task_name),
            wait_time_after_min_received=self.straggler_wait,
        )
        if task_name == payload.TRAIN_TASK and results:
            self._slowest_round = max(getattr(self, "_slowest_round", 0.0), time.monotonic() - started)
        return results

    def _deadline(self, task_name: str) -> int:
        """Seconds a task may take before its silent sites count as failed (FLARE's task timeout). A job
        may set `task_timeout`; without it no task waits forever (a site that never started once left a
        job waiting until it was killed): admission and reveals are small (5 min); a training round gets
        an hour the first time, then 5x the slowest round so far (at least 10 min); a re-run or the
        final validation, which encrypt or decrypt the model once, 10 min or 2x the slowest round."""
        if self.task_timeout:
            return int(self.task_timeout)
        slowest = getattr(self, "_slowest_round", 0.0)
        if task_name == payload.TRAIN_TASK:
            return 3600 if not slowest else int(max(600.0, 5 * slowest))
        if task_name in (REMASK_TASK, payload.VALIDATE_TASK):
            return int(max(600.0, 2 * slowest))
        return 300

    def _streamed(self, model: FLModel, targets: list[str]) -> FLModel:
        """The task's model as a stream reference; the previous task's stream ends here (every site that
        answered it has pulled it; one that did not is out of that round anyway)."""
        streaming.withdraw(getattr(self, "_last_offer", None))
        self._last_offer = None
        if not payload.is_encrypted(model.params) or not streaming.worth_streaming(model.params[payload.CKKS_KEY]):
            return model
        cell = self.fl_ctx.get_engine().get_cell()
        self._last_offer = streaming.offer(cell, model.params, targets)
        return FLModel(
            params=self._last_offer,
            meta=dict(model.meta or {}),
            current_round=model.current_round,
            total_rounds=model.total_rounds,
        )

    def _final_validation(self, targets: list[str]) -> dict:
        per_site: dict[str, dict] = {}
        if self._global is not None and targets:
            outgoing = self._global
            outgoing.current_round = self.num_rounds
            if self.encrypted:
                outgoing.meta[SECAGG_KEY] = self._roster.task(self.num_rounds, "validate", targets)
            results = self._collect("validate", self._stamped(outgoing), targets)
            for result in results:
                site = result.meta.get("client_name", "?")
                payload.record_anchor(self.audit, result.meta, job=self.job, round_num=self.num_rounds, peer=site)
                if result.metrics:
                    per_site[site] = dict(result.metrics)
        metrics: dict[str, float] = {}
        if per_site:
            keys = set.intersection(*(set(m) for m in per_site.values()))
            metrics = {k: float(np.nanmean([m[k] for m in per_site.values()])) for k in sorted(keys)}
        return {"metrics": metrics, "per_site": per_site, "primary_metric": self.primary_metric}

    def _pooled_roc(self, validated: list[str]) -> dict:
        """summary.json's `roc`: the final model's ROC over the held-out patients of the sites that
        validated it, from their encrypted score histograms (`clinfed.fl.roc_validation`)."""
        if not self.encrypted:
            return {"status": "skipped", "reason": "a plaintext job releases no pooled ROC (the server would see "
                    "each site's score histogram)"}  # fmt: skip

        def ask(params: dict, meta: dict, targets: list[str], everyone: bool) -> list[FLModel]:
            model = self._stamped(FLModel(params=params, meta=meta, current_round=self.num_rounds))
            results = self._collect(ROC_TASK, model, targets, wait_for_all=everyone)
            for result in results:  # every reply's audit-chain head, as for every other task
                site = result_site(result)
                payload.record_anchor(self.audit, result.meta, job=self.job, round_num=self.num_rounds, peer=site)
            return results

        roc = federated_roc(ask, self._roster, self.ctx, self.fingerprint, self.num_rounds, validated, log=self.info)
        self.audit.append("roc", job=self.job, status=roc.get("status"), reason=roc.get("reason", ""))
        return roc


def layout_json(params: dict) -> str | None:
    """Canonical layout (names, shapes, dtypes) of an update, encrypted or not; None if unreadable."""
    from clinfed.he.packing import flatten, layout_from_json, layout_to_json

    try:
        if payload.is_encrypted(params) or streaming.is_streamed(params):
            return layout_to_json(layout_from_json(params[payload.LAYOUT_KEY]))
        return layout_to_json(flatten({k: np.asarray(v) for k, v in params.items()})[1])
    except (TypeError, ValueError, KeyError):
        return None


def mean_bytes_sent(rounds: list[dict]) -> float | None:
    """Mean bytes one site sent in one round, over the site-rounds that went through (None: none did)."""
    sent = [e["bytes_sent"] for r in rounds for e in r["sites"].values() if e.get("status") == "ok"]
    return float(np.mean(sent)) if sent else None


def compression_block(fraction: float, info: dict, rounds: list[dict]) -> dict | None:
    """summary.json's `compression`: what was sent per site-round against the dense update (None: dense)."""
    if not fraction:
        return None
    block = {"fraction": float(fraction), **info}
    block["bytes_per_site_round"] = int(mean_bytes_sent(rounds) or 0)
    if info.get("ciphertexts") and info.get("dense_ciphertexts"):
        block["ciphertext_fraction"] = info["ciphertexts"] / info["dense_ciphertexts"]
    if info.get("dense_upload_bytes"):
        block["bytes_fraction"] = block["bytes_per_site_round"] / info["dense_upload_bytes"]
    return block
