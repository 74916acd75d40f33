"""One encrypted-sums job for every analytics method (`survival_km`, `cox_ph`, `glm`, `cohort_stats`) on FLARE.

Why one: Kaplan–Meier, Cox, GLM and the descriptive statistics differ only in what a site sums and
how the sum steps the fit (`clinfed.analytics.methods`, `cohort_method`); the protocol, the
encryption, the contributor floor, admission and the ledger, the audit log and summary.json are the
same, so they live here once, as `clinfed.fl.recipe` composes training.

Protocol (round r; two tasks per round):

=================  ================================================================================
``clinical_sums``  server → every active site: the method's phase and, after round 0, the current
                   iterate *encrypted by the release site* (round 0: public settings only). Each site
                   runs the method's own check (`Method.vet`: cohort_stats asks its release log),
                   computes its vector of sums on its complete cases, appends a contributor slot
                   (1.0), encrypts it (`he.ckks.encrypt_vector`) and returns the ciphertexts. The
                   server vets and adds them (`he.aggregation.EncryptedSum`); a site that fails or
                   refuses is reported with a one-line reason and left out (round 0 only: a site
                   lost mid-fit would change the likelihood, so the job stops instead).
``clinical_step``  server → release site (the first site by name; it holds the key like every
                   site): the encrypted sum and the sites the server says are in it. The release
                   site decrypts, checks the contributor slot (≥ 3, and the number the server
                   names), and runs the method's step. It answers with the next iterate
                   *encrypted* (the server never sees β) or with the released block as plaintext
                   JSON: rounded to 7 significant digits (counts exact), after disclosure control
                   and the method's last check of what it releases (`Method.vet_release`).
=================  ================================================================================

The server holds only the public CKKS context: it adds ciphertexts and forwards them, and sees the
released result and nothing else. Disclosure control: KM per-bin counts are merged/truncated to the
minimum cell at the release site (`km.enforce_min_cell`); GLM's DataSHIELD check runs at each site
on its own counts before it sends anything (`glm.disclosure_check`, a refusal); every method needs
≥ 3 contributing sites (`he.aggregation.MIN_CONTRIBUTORS`: refused at recipe construction, checked
by the server and by the release site in the ciphertext's contributor slot). The minimum cell is the
site policy's `min_cell` (default 5) or a job's larger one: a job may only raise it (issue 23); the
policy's `max_params_per_observation` caps GLM's parameters per row and its `min_sites` (≥ 3) the
fewest sites in any sum the site's rows enter.

Before round 0 an ``admit`` task asks every site to accept or refuse the whole job (its data load,
and with output DP the planned spend against the site's budget, `max_job_epsilon` and δ): a
job refused by so many sites that fewer than three remain stops there, with nothing sent and
nothing charged. With output DP (`methods.Method.dp`: survival_km, a patient is one count; and
cohort_stats, Laplace or Gaussian over its four families), each site reserves the spend in its
ledger before its first vector leaves (Gaussian: RDP spends, `Method.planned_spends`; Laplace: pure
ε, `Method.planned_pure_epsilon`), and the release site adds the noise to the decrypted sum before
anything is derived from it. Where a site's rows come from is the method's (`Method.read`: its
database by default; cohort_stats also its CSV, the bundled demo rows or the PSI-linked cohort).
Every message carries its sender's audit-chain head and the receiver records it (``anchor``), as
training does.

summary.json: ``encrypted: true``, ``admission`` (per site), ``rounds`` (per round: phase, per-site
status, bytes_sent and reason, and the release site's step), ``rounds_completed``, the method's
block (`km`, `cox`, `glm` or `statistics`, schema of issue 13) and the method's own fields
(`Method.summary_fields`), ``provenance[block]``: contributing sites, n used, what was suppressed,
and with output DP ``dp`` and ``privacy.epsilon_charged`` per site.
"""

from __future__ import annotations

import copy
import json
import math
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from clinfed.analytics.methods import FIXED_POINT_BITS, Method, SiteInfo
from clinfed.analytics.registry import make_method
from clinfed.analytics.release_log import FIT_BLOCKS, FitDefinition, ReleaseLog, rows_digest, value_digests
from clinfed.analytics.splits import check_split, split_manifest  # noqa: F401  (the jobs' import path)
from clinfed.audit import AuditLog, payload_digest
from clinfed.errors import SiteRefusal
from clinfed.fl import faults, payload
from clinfed.fl.node_policy import check_node_policy
from clinfed.fl.participant import SitePolicy, participant_root, server_context, site_context
from clinfed.fl.secagg import (
    HELLO_KEY,
    REMASK_TASK,
    REVEAL_TASK,
    SECAGG_KEY,
    SUM_KEY,
    ServerRoster,
    SiteSecAgg,
    collect_reveals,
    complete_round,
    load_site,
    result_site,
    sum_info,
)
from clinfed.he.aggregation import MIN_CONTRIBUTORS
from clinfed.privacy.ledger import BudgetExceeded, PrivacyLedger, site_ledger
from clinfed.textio import json_default, one_line, safe_job_label

ADMIT_TASK = payload.ADMIT_TASK
SUMS_TASK = "clinical_sums"
STEP_TASK = "clinical_step"
TASKS = (ADMIT_TASK, SUMS_TASK, STEP_TASK, REMASK_TASK, REVEAL_TASK)
PURPOSE = "sums"  # what secure aggregation binds this job's sums to (with the run, round and members)
VEC_KEY = "sums"
SUMMARY_FILE = "summary.json"
SIGNIFICANT_DIGITS = 7
#: Seconds the server waits for a task's answers: a site that died (or never started) is reported as
#: "no result" and left out, instead of stalling the job (every task here takes seconds).
TASK_TIMEOUT = 300
#: Once the floor (3) has answered, seconds to wait for the other sites before going on without them
#: (secure aggregation then re-runs the sum among the survivors): a dead site must not stall the job.
STRAGGLER_WAIT = 30


def round_release(value: Any, digits: int = SIGNIFICANT_DIGITS) -> Any:
    """Every float in a released structure to `digits` significant digits; ints (counts) and text exact.

    A relative grid: the release carries no more precision than a statistician reads, and the CKKS
    error (≤ 1e-8 relative) falls below it.
    """
    if isinstance(value, dict):
        return {k: round_release(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [round_release(v, digits) for v in value]
    if isinstance(value, bool | int) or value is None:
        return value
    if isinstance(value, float | np.floating):
        v = float(value)
        return float(f"{v:.{digits - 1}e}") if math.isfinite(v) else None
    return value


def two_limbs(vec: np.ndarray, base: float) -> np.ndarray:
    """[lo, hi] with vec = lo + hi·base, hi = round(vec / base) an integer and |lo| ≤ base / 2.

    Why: CKKS decodes a sum correctly only while every slot stays under a bound (~2e5 per site at
    five sites with the default parameters, `he.params.max_abs_value`), and clinical sums pass it
    (Σ age² over 230 patients is 7e5; Harrell's C counts n²/2 pairs). Split in two limbs, each slot
    stays under the bound, and since the summed `hi` limb is a sum of integers it is rounded back
    exactly after decryption: the sum is recovered to CKKS precision on `lo` (~1e-9) up to
    base × bound (~1e10), at the cost of twice the slots (usually still one ciphertext).
    """
    hi = np.rint(vec / base)
    return np.concatenate([vec - hi * base, hi])


def from_limbs(wire: np.ndarray, base: float) -> np.ndarray:
    """The inverse of `two_limbs` on a (summed) vector: lo + round(hi)·base."""
    n = wire.size // 2
    return wire[:n] + np.rint(wire[n:]) * base


def int_limbs(q: np.ndarray, base: float, limbs: int = 3) -> np.ndarray:
    """Integers `q` as `limbs` balanced base-`base` digits (each |digit| ≤ base/2), digit-major.

    Every digit is an integer under the CKKS bound, so rounding each decrypted digit gives `q` back
    exactly: how an iterate on the `methods.fixed_point` grid reaches the sites bit for bit.
    """
    rest = np.asarray(q, dtype=np.float64)
    digits = []
    for _ in range(limbs - 1):
        hi = np.rint(rest / base)
        digits.append(rest - hi * base)
        rest = hi
    digits.append(rest)
    return np.concatenate(digits)


def from_int_limbs(wire: np.ndarray, base: float, limbs: int = 3) -> np.ndarray:
    """The inverse of `int_limbs` on decrypted digits (each rounded to its integer first)."""
    parts = np.rint(np.asarray(wire, dtype=np.float64)).reshape(limbs, -1)
    total = parts[-1]
    for part in parts[-2::-1]:
        total = total * base + part
    return total


def _layout_json(size: int) -> str:
    from clinfed.he.packing import flatten, layout_to_json

    return layout_to_json(flatten({VEC_KEY: np.zeros(size)})[1])


def _entry(meta: dict) -> dict:
    return {
        "status": meta.get("status", "failed"),
        "reason": meta.get("reason", ""),
        "metrics": meta.get("metrics", {}),
        "bytes_sent": int(meta.get("bytes_sent", 0) or 0),
        **({"epsilon": float(meta["epsilon"])} if meta.get("epsilon") is not None else {}),
    }


# --- site side ------------------------------------------------------------------------------------------
RUN_KEY = "run_key"  # meta key: the server's key for this run (the secure-aggregation state is kept under it)


class SumsExecutor(Executor):
    """A site's part of every clinical analytics job: its vector of sums, encrypted; and, if it is the
    release site, the step from the decrypted sum to the next encrypted iterate or the release.

    Never raises into FLARE for a site-level problem: it answers status "failed" or "refused" with a
    one-line reason naming the site.
    """

    def __init__(
        self,
        method: dict | None = None,
        num_sites: int = 3,
        min_cell: int = 5,
        job_label: str = "clinical",
        release_site: str | None = None,
    ):
        super().__init__()
        # FedJob serialises a component from the attributes named like its __init__ arguments.
        self.method, self.num_sites, self.min_cell, self.job_label = dict(method or {}), num_sites, min_cell, job_label
        self.release_site = release_site  # None: the first of the sites the sum holds, by (length, name)
        self._ready = False
        self._answered = False
        self._data: Any = None
        self._admission: dict | None = None
        self._charged: float | None = None
        self._secagg: SiteSecAgg | None = None
        self._kept: tuple[int, np.ndarray] | None = None  # this round's wire vector, for a re-run
        self._run_key = ""

    def _setup(self, fl_ctx: FLContext, meta: dict) -> None:
        if self._ready:
            if str(meta.get(RUN_KEY) or "") != self._run_key:
                raise SiteRefusal(f"{self.site}: the server changed the run's key mid-job; refusing")
            return
        safe_job_label(self.job_label, self.site)  # issue 23, item 8: job config never names a path
        self._m: Method = make_method(self.method)
        self.root = participant_root(fl_ctx)
        self.policy = SitePolicy.load(self.root)
        self.audit = AuditLog(self.root, self.site)
        self._ctx, self._fingerprint = site_context(self.root, self.site)
        self.run_id = str(fl_ctx.get_job_id() or "")
        self._run_key = str(meta.get(RUN_KEY) or "")  # fixed for the job: a change mid-job is refused
        # no kit: no job. Restored from local/ when FLARE re-created this executor mid-run.
        self._secagg = load_site(self.root, self.site, self._secagg_run(meta), self.policy.min_sites)
        self._m.max_params_per_observation = self.policy.max_params_per_observation  # the site's cap, not the job's
        info = SiteInfo(self.site, self.root, self.policy, self.run_id, self.job_label, int(self.num_sites))
        check_node_policy(self.policy, self.site, self.job_label, self._m)  # before any SQL runs here
        # by default the hospital's database through its policy (SQLAlchemy URL + column mapping), else its split
        self._load(self._m.read(info))
        self.audit.append("job_start", job=self.job_label, encrypted=True, method=self._m.block)
        self._ready = True

    def _secagg_run(self, meta: dict) -> str:
        """What the secure-aggregation state is kept under: the job id and the server's key for this run
        (FLARE's simulator names every job alike, so the job id alone would mix two simulations' keys).
        The server choosing the key gives it nothing a new job would not: releases stay bound to the job
        (``run_id``) and the release log."""
        return f"{self.run_id}:{meta.get(RUN_KEY) or ''}"

    def _load(self, table: Any) -> None:
        """The method's rows from the site's table; for an exact fit also which rows and what values it
        uses, for the release log (`_admit_release`)."""
        self._data = self._m.load(table, self.site, self._min_cell({}))
        if self._m.block in FIT_BLOCKS:
            variables = self._m.variables()
            self._rows, self._values = rows_digest(table, variables), value_digests(table, variables)

    def _admit_release(self, meta: dict) -> None:
        """An exact KM, Cox or GLM release goes through the site's release log before its first vector
        leaves (issue 23, item 7; the rule: `ReleaseLog.admit_fit`). Output-DP releases are charged instead."""
        if self._m.block not in FIT_BLOCKS or self._m.dp is not None or self.__dict__.get("_release_logged"):
            return
        ReleaseLog(self.root, self.site).admit_fit(
            self._m.block,
            FitDefinition.of(list(meta.get("sites") or []), self._rows),
            self._m.release_grid(self._min_cell(meta)),
            self._values,
            job=self.job_label,
            run=self.run_id,
        )
        self._release_logged = True

    # --- privacy: admission, the ledger, the noise -------------------------------------------------------
    def _ledger(self) -> PrivacyLedger:
        return site_ledger(self.root, self.site, self.policy, self.audit)

    def _admit(self) -> dict:
        """Accept or refuse the whole job once, before any sum leaves: with output DP, the planned spend
        against this site's δ, `max_job_epsilon` and budget (nothing is written to the ledger here)."""
        if self._admission is not None:
            return self._admission
        planned, pure = self._m.planned_spends(), self._m.planned_pure_epsilon()
        admission = {"status": "accepted", "planned_epsilon": 0.0}
        if planned or pure:
            dp = self._m.dp or {}
            if float(dp.get("delta", 0.0)) > self.policy.delta:
                raise SiteRefusal(
                    f"{self.site}: the job's δ {float(dp['delta']):g} exceeds this site's δ {self.policy.delta:g}"
                )
            ledger = self._ledger()
            own = ledger.epsilon_of_run_if(self.run_id, planned, pure)
            if own > self.policy.max_job_epsilon:
                raise SiteRefusal(
                    f"{self.site}: the job's output DP costs ε {own:.2f} > this site's max_job_epsilon "
                    f"{self.policy.max_job_epsilon:g}"
                )
            try:
                projected = ledger.admit(self.policy.epsilon_budget, planned, pure)
            except BudgetExceeded as exc:
                raise SiteRefusal(one_line(exc, self.site)) from None
            admission.update(planned_epsilon=round(own, 6), projected_site_epsilon=round(projected, 6))
        self.audit.append("job_admitted", job=self.job_label, run=self.run_id, **admission)
        self._admission = admission
        return admission

    def _charge(self) -> float:
        """Reserve this job's output-DP spend before the first vector leaves; the ε this run costs."""
        if self._charged is None:
            self._charged = 0.0
            spends: list[dict] = [
                {"noise_multiplier": z, "sample_rate": q, "steps": steps} for z, q, steps in self._m.planned_spends()
            ]
            pure = self._m.planned_pure_epsilon()
            if pure:
                spends.append({"mechanism": "laplace", "epsilon": pure})
            for spend in spends:
                ledger = self._ledger()
                try:
                    ledger.reserve(self.job_label, 0, run=self.run_id, budget=self.policy.epsilon_budget, **spend)
                except BudgetExceeded as exc:
                    raise SiteRefusal(one_line(exc, self.site)) from None
                self._charged = ledger.epsilon_of_run(self.run_id)
        return self._charged

    def _min_cell(self, meta: dict) -> int:
        """The site policy's floor (default 5) or a job's stricter one: a job may only raise it (issue 23)."""
        floors = [self.policy.min_cell, self.min_cell, meta.get("min_cell")]
        return max(int(v) for v in floors if v is not None)

    def _check_min_sites(self, count: int, what: str) -> None:
        """This site's rows enter no sum of fewer sites than its policy's `min_sites` (≥ 3), whatever the job."""
        floor = max(MIN_CONTRIBUTORS, int(self.policy.min_sites))
        if count < floor:
            raise SiteRefusal(
                f"{self.site}: {what} {count} site(s), fewer than this site's min_sites {floor}; refusing"
            )

    def _limbs(self) -> tuple[float, float]:
        """(per-site bound on an encoded value, limb base 2^k ≤ that bound), public and equal at every site."""
        from clinfed.he.ckks import context_params
        from clinfed.he.params import max_abs_value

        bound = max_abs_value(context_params(self._ctx)) / max(int(self.num_sites), 1)
        return bound, 2.0 ** math.floor(math.log2(bound))

    def _encrypt(self, vec: np.ndarray, round_num: int, members: list[str]) -> dict:
        """Encrypt `vec` as two limbs, [lo, hi] with vec = lo + hi·base, hi an integer (see `two_limbs`), or
        as it is for a method that keeps its slots under the bound itself (`Method.wire_limbs` 1); masked
        for ``members`` (secure aggregation) and kept until the round is unmasked (a re-run masks it again)."""
        bound, base = self._limbs()
        vec = np.asarray(vec, dtype=np.float64)
        two = self._m.wire_limbs == 2
        wire = two_limbs(vec, base) if two else vec
        if np.abs(wire).max(initial=0.0) > bound:
            raise ValueError(
                f"{self.site}: a sum reaches {np.abs(vec).max():.4g}, over the ±{bound * base if two else bound:.4g} "
                f"that {self.num_sites} sites can add under these CKKS parameters (rescale the covariates)"
            )
        self._kept = (round_num, wire)
        return self._masked(wire, round_num, members)

    def _masked(self, wire: np.ndarray, round_num: int, members: list[str]) -> dict:
        from clinfed.he.ckks import encrypt_vector
        from clinfed.he.masking import MaskedStream, ring_of

        mask = MaskedStream(self._secagg.mask(round_num, PURPOSE, members, ring_of(self._ctx)))
        cts = encrypt_vector(self._ctx, wire, mask=mask)
        return payload.encrypted_params(cts, _layout_json(wire.size), self._fingerprint)

    def _encrypt_iterate(self, iterate: np.ndarray) -> dict:
        """The next iterate (on the 2^-40 grid) as exact integer limbs: every site evaluates this very point."""
        from clinfed.he.ckks import encrypt_vector

        scale = 2.0**FIXED_POINT_BITS
        q = np.rint(np.asarray(iterate, dtype=np.float64) * scale)
        if np.abs(q).max(initial=0.0) >= 2.0**53:
            raise ValueError(f"{self.site}: an iterate reaches {np.abs(iterate).max():.4g}: the fit diverged")
        wire = int_limbs(q, self._limbs()[1])
        return payload.encrypted_params(encrypt_vector(self._ctx, wire), _layout_json(wire.size), self._fingerprint)

    def _decrypt_iterate(self, params: dict, size: int) -> np.ndarray:
        from clinfed.he.ckks import decrypt_vector

        self._check_sum_params(params, "iterate")
        wire = decrypt_vector(self._ctx, params[payload.CKKS_KEY], 3 * size)
        return from_int_limbs(wire, self._limbs()[1]) / 2.0**FIXED_POINT_BITS

    def _check_sum_params(self, params: dict, what: str) -> None:
        if not payload.is_encrypted(params):
            raise SiteRefusal(f"{self.site}: the server sent the {what} in plaintext; this job runs under CKKS")
        if params.get(payload.FINGERPRINT_KEY) != self._fingerprint:
            raise SiteRefusal(f"{self.site}: the {what} was encrypted under another federation's key")

    def _decrypt(self, params: dict, size: int, what: str, info: dict | None, round_num: int) -> np.ndarray:
        """The sum, unmasked with its members' reveals (checked: every member signed this round's set)."""
        from clinfed.he.ckks import decrypt_vector, real_unmasked
        from clinfed.he.masking import MaskedStream, ring_of

        self._check_sum_params(params, what)
        ring = ring_of(self._ctx)
        correction = MaskedStream(self._secagg.correction(info, ring, expect_round=round_num, purpose=PURPOSE))
        cts = real_unmasked(self._ctx, params[payload.CKKS_KEY], correction)
        wire = decrypt_vector(self._ctx, cts, self._m.wire_limbs * size)
        return from_limbs(wire, self._limbs()[1]) if self._m.wire_limbs == 2 else wire

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in TASKS:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        self.site = fl_ctx.get_identity_name()
        round_num = 0
        try:
            incoming = FLModelUtils.from_shareable(shareable)
            meta = incoming.meta or {}
            round_num = int(meta.get("round", 0))
            self._setup(fl_ctx, meta)
            if meta.get("settings") != self._m.digest():
                raise SiteRefusal(f"{self.site}: the server's analysis settings differ from this site's job config")
            payload.record_anchor(self.audit, meta, job=self.job_label, round_num=round_num, peer="server")
            start = time.monotonic()
            phase = str(meta.get("phase", ""))
            params = incoming.params or {}
            if task_name == ADMIT_TASK:
                payload.check_own_anchor(self.audit, meta, self.site)  # a rolled-back folder refuses (issue 23)
                return self._reply({}, round_num, start, {"admission": self._admit(), HELLO_KEY: self._secagg.hello()})
            fault = faults.injected_fault(self.site)  # simulator only (`clinfed.fl.faults`)
            if (fault == "crash" and task_name == SUMS_TASK) or (
                fault == "vanish" and task_name in (REMASK_TASK, REVEAL_TASK)
            ):
                faults.crash_now()
            info = meta.get(SECAGG_KEY) or {}
            self._secagg.join(info.get("roster"))
            members = list(info.get("members") or [])
            if task_name == REVEAL_TASK:
                reveal = self._secagg.reveal(round_num, PURPOSE, members)
                self._kept = None
                return self._reply({}, round_num, start, {"reveal": reveal})
            if task_name == REMASK_TASK:
                if self._kept is None or self._kept[0] != round_num:
                    raise SiteRefusal(f"{self.site}: asked to re-upload round {round_num}, which it no longer holds")
                return self._reply(self._masked(self._kept[1], round_num, members), round_num, start, {})
            if task_name == SUMS_TASK:
                self._check_min_sites(len(set(meta.get("sites") or [])), "the server asks")
                self._admit()  # a server that skipped admission gets the same checks here
                epsilon = self._charge()
                self._admit_release(meta)  # exact fits: the release log first (issue 23)
                size = self._m.iterate_size(phase)
                iterate = None
                if size and (params or self._answered):  # round 0 alone starts from the method's own β = 0
                    iterate = self._decrypt_iterate(params, size)
                self._answered = True
                self._m.vet(self._data, phase, iterate, list(meta.get("sites") or []))
                vec = np.concatenate([self._m.site_local(self._data, phase, iterate), [1.0]])
                extra = {"epsilon": epsilon} if self._m.dp is not None else {}
                return self._reply(self._encrypt(vec, round_num, members), round_num, start, extra)
            return self._step_once(params, meta, round_num, phase, start)
        except SiteRefusal as exc:
            return self._status("refused", one_line(exc, self.site), round_num)
        except Exception as exc:  # a site-level failure is reported, never allowed to stall the job
            reason = one_line(exc, self.site)
            self.log_error(fl_ctx, reason)
            return self._status("failed", reason, round_num)

    def _step_once(self, params: dict, meta: dict, round_num: int, phase: str, start: float) -> Shareable:
        """One step per (run, round, phase), from one sum, at the job's release site only (issue 23, item 1).

        Why: every site charged its ledger once for the run's output DP. Were a step answered again
        (at this site or at another: every site holds the key), each answer would draw fresh noise, and
        N answers averaged shrink it by √N. So the identical sum sent again gets the identical answer
        (nothing new drawn), another sum for a round already stepped, or any step after the release,
        is refused, and only the release site steps at all. Iterative fits gain the same: a repeated
        step can no longer advance the release site's Newton/IRLS state twice.
        """
        named = list(meta.get("sites") or [])
        release_site = self.release_site or (min(named, key=lambda s: (len(s), s)) if named else None)
        if self.site != release_site:
            raise SiteRefusal(
                f"{self.site}: only the job's release site ({release_site}) steps a sum; refusing a second release"
            )
        key = (self.run_id, round_num, phase)
        digest = payload.payload_sha256(params)
        steps: dict = self.__dict__.setdefault("_steps", {})
        if key in steps:
            seen, reply = steps[key]
            if seen != digest:
                raise SiteRefusal(
                    f"{self.site}: round {round_num} ({phase}) of run {self.run_id} was already stepped from another "
                    "sum; refusing (one release per charged sum)"
                )
            self.audit.append("step_repeated", job=self.job_label, round=round_num, run=self.run_id, sha256=digest)
            return copy.deepcopy(reply)
        released = self.__dict__.get("_released_at")
        if released is not None:
            raise SiteRefusal(
                f"{self.site}: run {self.run_id} was already released (round {released[1]}); refusing another step"
            )
        reply = self._step(params, meta, round_num, phase, start)
        out = FLModelUtils.from_shareable(copy.deepcopy(reply))
        if (out.meta or {}).get("status") == "ok":
            steps[key] = (digest, copy.deepcopy(reply))
            if "release_json" in out.meta:
                self._released_at = key
        return reply

    def _step(self, params: dict, meta: dict, round_num: int, phase: str, start: float) -> Shareable:
        """Release site: decrypt the sum, check who is in it, step; encrypted iterate or the release."""
        summed = self._checked_sum(params, meta, round_num, phase)
        named = list(meta.get("sites") or [])
        # Output DP: the noise goes on before anything is derived from the sum (fresh OS entropy).
        sums = self._m.noisy(summed[:-1], np.random.default_rng(secrets.randbits(128)))
        step = self._m.step(sums, phase, self._min_cell(meta))
        if step.result is None:
            assert step.iterate is not None
            return self._reply(self._encrypt_iterate(step.iterate), round_num, start, {"phase": step.phase})
        self._m.vet_release(self._data, step.result, named)
        release = {
            self._m.block: round_release(step.result),
            "provenance": {
                self._m.block: {
                    "sites": sorted(named),
                    "n": int(step.n),
                    "suppressed": step.suppressed,
                    "run": self.run_id,  # the release is bound to its run and round (issue 23, item 1)
                    "round": round_num,
                },
            },
            **step.extra,
        }
        if self._m.dp is not None and release.get("dp") is None:
            release["dp"] = {**self._m.dp, "sensitivity": self._m.dp_sensitivity, "releases": self._m.dp_releases}
        text = json.dumps(release, sort_keys=True, default=json_default)
        self._save_plot(release[self._m.block])
        return self._reply({}, round_num, start, {"release_json": text}, released=len(text))

    def _checked_sum(self, params: dict, meta: dict, round_num: int, phase: str) -> np.ndarray:
        """The decrypted, unmasked sum, refused unless it holds exactly the sites the server names (≥ 3).
        A forged sum (one site's vector added thrice, a public-key "count") decrypts to noise whose
        count slot is no small whole number: refused here, before anything is derived from it."""
        summed = self._decrypt(params, self._m.size(phase) + 1, "sum", meta.get(SUM_KEY), round_num)
        raw = float(summed[-1])
        count = round(raw)
        named = list(meta.get("sites") or [])
        if not math.isfinite(raw) or abs(raw - count) > 0.01 or count > 10_000:
            raise SiteRefusal(
                f"{self.site}: the sum's count slot reads {raw:.4g}, not a whole number of sites: not the members' "
                "uploads added once each (forged or partial); refusing"
            )
        if count < MIN_CONTRIBUTORS:
            raise SiteRefusal(f"{self.site}: the sum holds {count} site vector(s), fewer than {MIN_CONTRIBUTORS}")
        self._check_min_sites(count, "the sum holds")
        if count != len(named) or self.site not in named:
            raise SiteRefusal(f"{self.site}: the sum holds {count} site vector(s) but the server names {len(named)}")
        return summed

    def _save_plot(self, block: dict) -> None:
        """The release site draws what it released (KM curves, Cox forest plot) in its own reports/
        folder, where `clinfed simulate` picks it up; a figure that fails to draw never fails the release."""
        from clinfed import plots

        draw = {"km": plots.plot_km, "cox": plots.plot_forest}.get(self._m.block)
        if draw is None:
            return
        try:
            label = safe_job_label(self.job_label, self.site)  # job config: never a path (issue 23)
            draw(block, self.root / "reports" / f"{label}-{self._m.block}.png")
        except Exception as exc:
            self.logger.warning(one_line(exc, self.site))

    def _reply(self, params: dict, round_num: int, start: float, extra: dict, released: int = 0) -> Shareable:
        if released:
            digest, size = payload_digest(extra["release_json"].encode()), released
            self.audit.append(
                "update_sent",
                job=self.job_label,
                round=round_num,
                site=self.site,
                sha256=digest,
                bytes=size,
                encrypted=False,
                kind="release",
            )
        else:
            digest, size = payload.log_update(
                self.audit, "update_sent", params, job=self.job_label, round_num=round_num, site=self.site
            )
        meta = {
            "status": "ok",
            "settings": self._m.digest(),
            "bytes_sent": size,
            "sha256": digest,
            "metrics": {"seconds": round(time.monotonic() - start, 4)},
            "min_cell_policy": self.policy.min_cell,
            payload.AUDIT_HEAD_KEY: list(self.audit.head),
            **extra,
        }
        return FLModelUtils.to_shareable(FLModel(params=params, meta=meta, current_round=round_num))

    def _status(self, status: str, reason: str, round_num: int) -> Shareable:
        meta = {"status": status, "reason": reason}
        if getattr(self, "audit", None) is not None:
            self.audit.append(status, job=self.job_label, round=round_num, site=self.site, reason=reason)
            meta[payload.AUDIT_HEAD_KEY] = list(self.audit.head)
        return FLModelUtils.to_shareable(FLModel(params={}, meta=meta, current_round=round_num))


# --- server side ------------------------------------------------------------------------------------------
class _Stop(Exception):
    """The job ends without a release; the reason goes into summary.json."""


class SumsController(ModelController):
    """Server side: dispatch rounds, add the sites' ciphertexts, forward the sum to the release site.

    Holds only the public CKKS context (`server_context` refuses a secret one) and never decrypts.
    """

    def __init__(
        self,
        method: dict | None = None,
        min_cell: int = 5,
        release_site: str | None = None,
        job_label: str = "clinical",
        task_timeout: int = TASK_TIMEOUT,
        straggler_wait: int = STRAGGLER_WAIT,
    ):
        super().__init__()
        self.method, self.min_cell, self.release_site = dict(method or {}), min_cell, release_site
        self.job_label, self.task_timeout, self.straggler_wait = job_label, task_timeout, straggler_wait

    def _sum_round(self, rnd: int, phase: str, iterate: dict, targets: list[str]) -> tuple[dict, dict, dict]:
        """One `clinical_sums` task, then secure aggregation's re-runs and reveals (`fl.secagg`):
        (entries per site, encrypted sum params or {} when it cannot be unmasked, the sum's reveals)."""
        # the sites asked: the release log of cohort_stats names its cohort by them
        meta = {**self._meta(phase, rnd, targets), "min_cell": self._min_cell, "sites": list(targets)}
        results = self._ask(SUMS_TASK, FLModel(params=iterate, meta=meta), targets)
        entries, acc, ok = self._add(rnd, phase, results, targets)

        def rerun(members: list[str]) -> tuple[object, list[str]]:
            self.audit.append("secagg_rerun", job=self.job_label, round=rnd, members=members)
            again = self._ask(REMASK_TASK, FLModel(params={}, meta=self._meta(phase, rnd, members)), members)
            sub, new_acc, survivors = self._add(rnd, phase, again, members)
            for site, entry in sub.items():
                if entry["status"] != "ok":
                    entries[site].update(status=entry["status"], reason=entry["reason"])
            return new_acc, survivors

        def reveal(members: list[str]) -> dict[str, dict]:
            answers = self._ask(REVEAL_TASK, FLModel(params={}, meta=self._meta(phase, rnd, members)), members, True)
            for result in answers:
                payload.record_anchor(
                    self.audit, result.meta, job=self.job_label, round_num=rnd, peer=result_site(result)
                )
            return collect_reveals(answers, members, entries)

        if len(ok) < MIN_CONTRIBUTORS:
            return entries, {}, {}
        done = complete_round(targets, acc, ok, MIN_CONTRIBUTORS, rerun, reveal)
        if done.reason:
            self.warning(f"{self.job_label} round {rnd}: {done.reason}")
            for site in targets:
                if entries[site]["status"] == "ok" and site not in done.members:
                    entries[site].update(
                        status="failed", reason=f"{site}: its upload could not be unmasked ({done.reason})"
                    )
            return entries, {}, {}
        cts, _, _ = done.acc.result()
        self.audit.append("aggregation", job=self.job_label, round=rnd, sites=done.members, encrypted=True)
        info = sum_info(rnd, PURPOSE, done.members, done.reveals or {})
        return entries, payload.encrypted_params(cts, _layout_json(self._size(phase)), self.fingerprint), info

    def _size(self, phase: str) -> int:
        return self._m.wire_limbs * (self._m.size(phase) + 1)  # limbs per value (`two_limbs`)

    def _ask(self, task: str, model: FLModel, targets: list[str], everyone: bool = False) -> list[FLModel]:
        """Send a task; wait for the floor, then `straggler_wait` for the rest (``everyone``: for all,
        as a reveal needs), never past `task_timeout`."""
        return self.broadcast_model(
            task_name=task,
            data=model,
            targets=targets,
            min_responses=len(targets) if everyone else min(MIN_CONTRIBUTORS, len(targets)),
            timeout=self.task_timeout,
            wait_time_after_min_received=self.straggler_wait,
        )

    def _add(self, rnd: int, phase: str, results: list[FLModel], targets: list[str]) -> tuple[dict, object, list[str]]:
        """Vet and add the uploads: (entries per site, the running sum, the sites in it)."""
        from clinfed.he.aggregation import EncryptedSum

        size = self._size(phase)
        acc = EncryptedSum(self.ctx, self.fingerprint, size=size)
        layout = _layout_json(size)
        entries: dict[str, dict] = {}
        for result in results:
            rmeta = result.meta or {}
            site = rmeta.get("client_name", "?")
            entry = _entry(rmeta)
            params = result.params or {}
            payload.record_anchor(self.audit, rmeta, job=self.job_label, round_num=rnd, peer=site)
            if entry["status"] == "ok":
                payload.log_update(self.audit, "update_received", params, job=self.job_label, round_num=rnd, site=site)
                try:
                    if rmeta.get("settings") != self._m.digest():
                        raise ValueError(f"{site}: its analysis settings differ from the job's")
                    if not payload.is_encrypted(params):
                        raise ValueError(f"{site}: sent a plaintext vector to an encrypted job")
                    if params.get(payload.LAYOUT_KEY) != layout:
                        raise ValueError(f"{site}: packed layout differs from the job's ({phase})")
                    acc.add(site, params[payload.CKKS_KEY], 1.0, params.get(payload.FINGERPRINT_KEY, ""))
                    if rmeta.get("min_cell_policy") is not None:
                        self._min_cell = max(self._min_cell, int(rmeta["min_cell_policy"]))
                except ValueError as exc:
                    entry.update(status="failed", reason=one_line(exc, site))
            if entry["status"] != "ok":
                self.warning(entry["reason"] or f"{site}: {entry['status']}")
                self.audit.append(entry["status"], job=self.job_label, round=rnd, site=site, reason=entry["reason"])
            entries[site] = entry
        for site in targets:
            entries.setdefault(
                site,
                {
                    "status": "failed",
                    "reason": f"{site}: no result (timed out or died)",
                    "metrics": {},
                    "bytes_sent": 0,
                },
            )
        ok = sorted(s for s, e in entries.items() if e["status"] == "ok")
        return entries, acc, ok

    def _meta(self, phase: str, rnd: int, members: list[str] | None = None) -> dict:
        """What every task carries: the settings digest, phase, round, the server's audit-chain head and
        (secure aggregation) the member set with the sites' signed keys."""
        return {
            "settings": self._m.digest(),
            RUN_KEY: self._run_key,
            "phase": phase,
            "round": rnd,
            payload.AUDIT_HEAD_KEY: list(self.audit.head),
            SECAGG_KEY: self._roster.task(rnd, PURPOSE, members or []),
        }

    def _admit(self, targets: list[str]) -> dict[str, dict]:
        """The `admit` task: each site accepts or refuses the whole job; (entries per site)."""
        meta = {**self._meta(self._m.first_phase, 0), payload.ANCHORS_KEY: payload.peer_anchors(self.audit, targets)}
        results = self._ask(ADMIT_TASK, FLModel(params={}, meta=meta), targets)
        entries: dict[str, dict] = {}
        for result in results:
            rmeta = result.meta or {}
            site = rmeta.get("client_name", "?")
            payload.record_anchor(self.audit, rmeta, job=self.job_label, round_num=0, peer=site)
            entry = {"status": rmeta.get("status", "failed"), "reason": rmeta.get("reason", "")}
            if entry["status"] == "ok" and not self._roster.add(site, rmeta.get(HELLO_KEY)):
                entry = {"status": "refused", "reason": f"{site}: sent no signed secure-aggregation key"}
            if entry["status"] == "ok":
                entry = {**entry, **(rmeta.get("admission") or {}), "status": "accepted"}
            else:
                self.warning(entry["reason"] or f"{site}: {entry['status']}")
            entries[site] = entry
        for site in targets:
            entries.setdefault(
                site, {"status": "failed", "reason": f"{site}: no answer to admission (timed out or died)"}
            )
        return entries

    def _step(
        self, rnd: int, site: str, phase: str, agg: dict, sites: list[str], info: dict
    ) -> tuple[dict, FLModel | None]:
        meta = {**self._meta(phase, rnd, sites), "sites": sites, "min_cell": self._min_cell, SUM_KEY: info}
        results = self.send_model_and_wait(
            task_name=STEP_TASK,
            data=FLModel(params=agg, meta=meta),
            targets=[site],
            min_responses=1,
            timeout=self.task_timeout,
        )
        if not results:
            return {
                "status": "failed",
                "reason": f"{site}: no step (timed out or died)",
                "metrics": {},
                "bytes_sent": 0,
            }, None
        rmeta = results[0].meta or {}
        payload.record_anchor(self.audit, rmeta, job=self.job_label, round_num=rnd, peer=site)
        return _entry(rmeta), results[0]

    def run(self) -> None:
        self._m = make_method(self.method)
        self.root = participant_root(self.fl_ctx, "server")
        self.audit = AuditLog(self.root, "server")
        self.ctx, self.fingerprint = server_context(self.root)
        self._min_cell = int(self.min_cell)
        self._roster = ServerRoster()  # the admitted sites' signed secure-aggregation keys
        self._run_key = f"{self.fl_ctx.get_job_id()}-{secrets.token_hex(6)}"  # one per run, in every task
        targets = sorted(self.sample_clients(), key=lambda s: (len(s), s))
        chosen = self.release_site if self.release_site in targets else targets[0]
        self.audit.append("job_start", job=self.job_label, encrypted=True, method=self._m.block)
        rounds: list[dict] = []
        outcome = {"status": "not released", "reason": "", "release_site": chosen, "contributors": []}
        release: dict = {}
        phase, iterate, active = self._m.first_phase, {}, targets
        started = time.monotonic()
        admission: dict[str, dict] = {}
        try:
            admission = self._admit(targets)
            active = sorted((s for s, e in admission.items() if e["status"] == "accepted"), key=lambda s: (len(s), s))
            if len(active) < MIN_CONTRIBUTORS:
                why = "; ".join(e["reason"] for e in admission.values() if e["status"] != "accepted")
                raise _Stop(f"only {len(active)} site(s) accepted the job (at least {MIN_CONTRIBUTORS} needed): {why}")
            if chosen not in active:
                raise _Stop(f"the release site {chosen} refused the job: {admission[chosen]['reason']}")
            for rnd in range(self._m.max_rounds):
                entries, agg, info = self._sum_round(rnd, phase, iterate, active)
                record = {"round": rnd, "phase": phase, "sites": entries}
                rounds.append(record)
                ok = sorted((s for s, e in entries.items() if e["status"] == "ok"), key=lambda s: (len(s), s))
                if rnd == 0:
                    active = ok
                    outcome["contributors"] = ok
                elif ok != active:
                    lost = sorted(set(active) - set(ok))
                    raise _Stop(f"{lost[0]} dropped out mid-fit ({entries[lost[0]]['reason']}); the sums would change")
                if len(active) < MIN_CONTRIBUTORS:
                    why = "; ".join(e["reason"] for e in entries.values() if e["status"] != "ok")
                    raise _Stop(f"only {len(active)} site(s) contributed (at least {MIN_CONTRIBUTORS} needed): {why}")
                if chosen not in active:
                    raise _Stop(f"the release site {chosen} did not contribute: {entries[chosen]['reason']}")
                entry, result = self._step(rnd, chosen, phase, agg, active, info)
                record["release"] = {chosen: entry}
                if entry["status"] != "ok" or result is None:
                    raise _Stop(f"the release site failed: {entry['reason']}")
                rmeta = result.meta or {}
                if "release_json" in rmeta:
                    release = self._read_release(rnd, chosen, rmeta["release_json"])
                    outcome["status"] = "released"
                    break
                phase, iterate = str(rmeta.get("phase")), result.params or {}
            else:
                raise _Stop(f"no result after {self._m.max_rounds} rounds")
        except _Stop as stop:
            outcome["reason"] = str(stop)
            self.warning(f"{self.job_label}: nothing released: {stop}")
        self.audit.append("job_end", job=self.job_label, rounds_completed=len(rounds), outcome=outcome["status"])
        self._write_summary(targets, rounds, outcome, release, time.monotonic() - started, admission)

    def _read_release(self, rnd: int, site: str, text: str) -> dict:
        self.audit.append(
            "update_received",
            job=self.job_label,
            round=rnd,
            site=site,
            sha256=payload_digest(text.encode()),
            bytes=len(text),
            encrypted=False,
            kind="release",
        )
        try:
            release = json.loads(text)
        except ValueError as exc:
            raise _Stop(f"{site}: its release is not valid JSON ({exc})") from None
        if not isinstance(release, dict) or self._m.block not in release:
            raise _Stop(f"{site}: its release carries no '{self._m.block}' block")
        return release

    def _write_summary(
        self, sites: list[str], rounds: list[dict], outcome: dict, release: dict, seconds: float, admission: dict
    ) -> None:
        contributors = set(outcome["contributors"]) if outcome["status"] == "released" else set()
        per_round = [sum(e["bytes_sent"] for e in r["sites"].values()) for r in rounds]
        summary = {
            "job": self.job_label,
            "method": self._m.block,
            "sites": sites,
            "encrypted": True,
            "rounds_completed": len(rounds),
            "rounds": rounds,
            "final": {
                "status": outcome["status"],
                "reason": outcome["reason"],
                "release_site": outcome["release_site"],
                "metrics": {
                    "sites_contributing": len(contributors),
                    "seconds": round(seconds, 3),
                    "bytes_per_round": round(sum(per_round) / max(len(per_round), 1), 1),
                    **self._m.release_metrics(release),
                },
                "per_site": {s: {"contributed": s in contributors} for s in sites},
                "primary_metric": "seconds",
            },
            self._m.block: release.get(self._m.block),
            "provenance": release.get("provenance", {}),
            "admission": admission,
            **self._m.summary_fields(release),
        }
        if self._m.dp is not None:
            summary["dp"] = release.get("dp")
            summary["privacy"] = {  # ε each site's ledger charged for this run (0: it sent nothing)
                "epsilon_charged": {
                    s: float(rounds[0]["sites"].get(s, {}).get("epsilon", 0.0)) if rounds else 0.0 for s in sites
                }
            }
        path = Path(self.get_run_dir()) / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2, default=json_default))
        self.info(f"summary written to {path}")


# --- the recipe -------------------------------------------------------------------------------------------
class SumsRecipe(Recipe):
    """A clinical analytics job: `SumsController` on the server, `SumsExecutor` at every site.

    Configuration only travels (`set_app_packages(["clinfed"])`): `method` is the JSON dict
    `methods.make_method` builds the strategy from, at the server and at every site.
    """

    def __init__(
        self,
        name: str,
        num_sites: int,
        method: dict,
        min_cell: int = 5,
        encrypt: bool = True,
        release_site: str | None = None,
        task_timeout: int = TASK_TIMEOUT,
        straggler_wait: int = STRAGGLER_WAIT,
    ):
        if num_sites < MIN_CONTRIBUTORS:
            raise ValueError(
                f"{name} needs at least {MIN_CONTRIBUTORS} sites (got {num_sites}): "
                "with two, each site could subtract its own sums from the result and read the other's"
            )
        if not encrypt:
            raise ValueError(f"{name} runs only under CKKS: the server must see sums it cannot read")
        if int(min_cell) < 1:
            raise ValueError(f"minimum cell must be ≥ 1, got {min_cell}")
        safe_job_label(name)
        make_method(method)  # refuses an unknown method or malformed config here, at submission
        job = FedJob(name=name, min_clients=num_sites)
        job.set_app_packages(["clinfed"])
        job.to_server(
            SumsController(
                method=dict(method),
                min_cell=int(min_cell),
                release_site=release_site,
                job_label=name,
                task_timeout=task_timeout,
                straggler_wait=int(straggler_wait),
            ),
            id="controller",
        )
        job.to_clients(
            SumsExecutor(
                method=dict(method),
                num_sites=num_sites,
                min_cell=int(min_cell),
                job_label=name,
                release_site=release_site,
            ),
            id="executor",
            tasks=list(TASKS),
        )
        self.num_sites, self.encrypt = num_sites, True
        super().__init__(job)
