"""The site side of a round: decrypt the global model, train with DP-SGD, encrypt the update.

`DPTrainExecutor` is a FLARE Executor configured entirely by JSON-able arguments (task name, training
and DP settings); the learning itself lives in `clinfed.training` and `clinfed.tasks`, the
cryptography in `clinfed.he`. It never raises into FLARE for a site-level problem: a refusal (budget
spent, policy) or a failure (bad data, NaN update) is returned as a result with a status and a one-line
reason naming the site, so the server can report it and the round can go on with the others.

A job is untrusted input. The site's own policy (`local/resources.json` → "clinfed", see
`SitePolicy`) decides whether DP is required, the δ and accountant every spend is composed at, the
largest ε one job may plan, the lifetime budget, and which metrics leave the site. At job start
(`admit` task) the site checks the job's settings and its *whole* planned spend against what is left
of its budget and accepts or refuses the job as a whole, so no ε is spent on a job the site would
drop half-way. Each round's spend is then reserved in the ledger (file-locked, cross-checked with
the audit log) before training.

Dense encrypted updates go in the compact format (`clinfed.he.compact`) when the train task carries
the job's `CompactSpec`: the site sends its share w / W of the admitted sites' total weight W, values
clipped to the spec's public `value_bound` (post-processing of the DP-trained model, so no privacy is
spent; the site's audit log and the reply count how many were clipped). Decryption is exact
(integers), so the compact global model needs no noise flooding. On the noise-tied grid
(`CompactSpec.for_noise`, the default for DP jobs) the site sends its *change* from the round's
global model, which it keeps (in memory and in `local/grid/`, per run) until the sum of that round
comes back: it then adds the decrypted average change to it. Its admission reply states the noise
std its DP-SGD puts in one round's change (`SiteTrainer.update_noise_std`), which the grid is cut to.

With `compression` (a fraction F of the coordinates, `clinfed.fl.compression`) the site sends its
model *change* at the round's shared coordinates only, keeps the rest in its error feedback, and
holds the global model itself: the server's sum is one round's k values, which each site decrypts and
adds to its own copy (`CompressedSite`). On a compact job the k values ride the compact key and grid
in `clinfed.he.truncated` (3.75 B per value sent, exact integers, no flooding).

Every encrypted upload is masked for secure aggregation (`clinfed.fl.secagg`): the site signs a fresh
X25519 key at admission, masks each round's upload for the member set the task names, keeps the
round's update to re-upload it for a smaller set if members drop out (`secagg_remask`: no retraining,
no second spend), reveals its self-mask seed once (`secagg_reveal`), and decrypts a sum only after
checking every member's signed reveal for it.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from clinfed.audit import AuditLog
from clinfed.errors import SiteRefusal
from clinfed.fl import faults, payload, streaming
from clinfed.fl.compression import LAYER, CompressedSite
from clinfed.fl.participant import SitePolicy, participant_root, site_context, site_index
from clinfed.fl.roc_validation import ROC_TASK, RocParty, held_out_scores, write_scores
from clinfed.fl.roc_validation import state_path as roc_state
from clinfed.fl.secagg import HELLO_KEY, REMASK_TASK, REVEAL_TASK, SECAGG_KEY, SUM_KEY, SiteSecAgg, load_site
from clinfed.fl.secagg import state_path as secagg_state
from clinfed.he.aggregation import TooFewContributors
from clinfed.privacy.ledger import BudgetExceeded, site_ledger
from clinfed.sysinfo import current_rss_mb, limit_malloc_arenas, release_free_memory
from clinfed.tasks import build_task
from clinfed.textio import one_line, safe_job_label
from clinfed.training import DPConfig, SiteTrainer, TrainConfig

ADMIT_TASK, TRAIN_TASK, VALIDATE_TASK = payload.ADMIT_TASK, payload.TRAIN_TASK, payload.VALIDATE_TASK
SITE_TASKS = (ADMIT_TASK, TRAIN_TASK, VALIDATE_TASK, REMASK_TASK, REVEAL_TASK, ROC_TASK)  # what a training site answers
AUDIT_HEAD_KEY = payload.AUDIT_HEAD_KEY


def site_dp_config(site: str, dp_args: dict, policy: SitePolicy) -> DPConfig:
    """The DP settings this site will train with: the job's, checked against the site's policy.

    Refuses (SiteRefusal, one line naming the setting) a job that asks for less privacy than the
    policy allows; the δ and accountant are always the site's own, never the job's.
    """
    known = {f.name for f in fields(DPConfig)}
    unknown = sorted(set(dp_args) - known)
    if unknown:
        raise SiteRefusal(f"{site}: job setting dp_args.{unknown[0]} is not a DP setting this site knows; refusing")
    job = DPConfig(**dp_args)
    if not job.enabled:
        if policy.require_dp:
            raise SiteRefusal(f"{site}: job setting dp_args.enabled=false refused: this site's policy requires DP")
        return job
    eps = job.target_epsilon
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps > 0):
        raise SiteRefusal(f"{site}: job setting dp_args.target_epsilon={eps!r} is not a positive number; refusing")
    if eps > policy.max_job_epsilon:
        raise SiteRefusal(
            f"{site}: job setting dp_args.target_epsilon={eps:g} exceeds this site's max_job_epsilon "
            f"{policy.max_job_epsilon:g}; refusing"
        )
    delta = job.delta
    if not (isinstance(delta, int | float) and 0 < delta <= policy.delta):
        raise SiteRefusal(
            f"{site}: job setting dp_args.delta={delta!r} exceeds this site's δ {policy.delta:g}; refusing"
        )
    clip = job.max_grad_norm
    if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
        raise SiteRefusal(f"{site}: job setting dp_args.max_grad_norm={clip!r} is not a positive number; refusing")
    return replace(job, delta=policy.delta, accountant=policy.accountant)


class DPTrainExecutor(Executor):
    def __init__(
        self,
        task: str = "breast_cancer",
        task_args: dict | None = None,
        train_args: dict | None = None,
        dp_args: dict | None = None,
        encrypt: bool = True,
        num_sites: int = 3,
        weight_unit: float = 1000.0,
        job_label: str = "",
        compression: float = 0.0,
    ):
        """
        Args:
            task: name in `clinfed.tasks.TASKS`.
            task_args / train_args / dp_args: keyword arguments of the task, `TrainConfig`, `DPConfig`
                (`dp_args` is a request: the site's policy checks it, see `site_dp_config`).
            encrypt: send CKKS ciphertexts (default) rather than plaintext weights.
            num_sites: federation size, used only to pick this site's part of the bundled demo data.
            weight_unit: aggregation weights are sample counts divided by this, keeping packed values
                small enough for the CKKS precision headroom (see `clinfed.he.params`).
            job_label: the job name recorded in the ledger and audit log.
            compression: send only this fraction of the update's coordinates (0: the whole update).
        """
        super().__init__()
        # FedJob serialises a component from the attributes named like its __init__ arguments:
        # keep every argument under its own name, or it silently falls back to the default.
        self.task, self.task_args = task, dict(task_args or {})
        self.train_args, self.dp_args = dict(train_args or {}), dict(dp_args or {})
        self.train_cfg = TrainConfig(**self.train_args)
        self.encrypt, self.num_sites, self.weight_unit = encrypt, num_sites, weight_unit
        self.job_label, self.compression = job_label, compression
        self._compressed: CompressedSite | None = None
        self._model_layout = None
        self._trainer: SiteTrainer | None = None
        self._admission: dict | None = None
        self._ctx = None
        self._cell = None  # this site's FLARE cell, set per task: streams are offered and pulled through it
        self._fingerprint = ""
        self._wire: tuple[str, float] | None = None  # this round's (CompactSpec JSON, admitted weight total)
        self._secagg: SiteSecAgg | None = None
        self._members: list[str] = []  # the member set this task's upload is masked for
        self._kept: tuple | None = None  # (round, update, n_train, extra): what a re-run encrypts again
        self._base: tuple[int, dict[str, np.ndarray]] | None = None  # (round, the global model it trained from)

    # --- state that lives for the whole job at this site -------------------------------------------
    def _setup(self, fl_ctx: FLContext, incoming: FLModel) -> None:
        if self._trainer is not None:
            return
        limit_malloc_arenas()  # see clinfed.sysinfo
        self.site = fl_ctx.get_identity_name()
        self.root = participant_root(fl_ctx)
        self.job = safe_job_label(self.job_label or fl_ctx.get_job_id(), self.site)  # never a path (issue 23)
        self.audit = AuditLog(self.root, self.site)
        self.policy = SitePolicy.load(self.root)
        # The job's DP request is checked before anything else: a refused job costs nothing.
        self.dp_cfg = site_dp_config(self.site, self.dp_args, self.policy)
        # Opening the ledger cross-checks it with the audit log: a deleted or rolled-back ledger refuses.
        self.ledger = site_ledger(self.root, self.site, self.policy, self.audit)
        if self.policy.require_encryption and not self.encrypt:
            raise SiteRefusal(f"{self.site}: local privacy policy requires encrypted updates; this job sends plaintext")
        if self.encrypt:
            self._ctx, self._fingerprint = site_context(self.root, self.site)
        task = build_task(self.task, **self.task_args)
        index = site_index(self.site)
        data_dir = self.policy.data_dir
        if data_dir is None and (index is None or index >= self.num_sites):
            raise SiteRefusal(f"{self.site}: no data_dir in local/resources.json and no bundled split for this name")
        data = task.load_site_data(self.site, index or 0, self.num_sites, data_dir)
        self.log_info(fl_ctx, f"{self.site}: data {data.description}")
        # Only a resubmission of the same job (same run key, after a server restart) continues a run.
        self.run_key = str(incoming.meta.get("run_key", "")) or fl_ctx.get_job_id()
        start = int(incoming.current_round or 0)
        if self.encrypt:  # before any data is touched: no kit, no masks, no job
            self._secagg = load_site(self.root, self.site, self.run_key, self.policy.min_sites)
        self._trainer = SiteTrainer(
            task,
            data,
            self.train_cfg,
            self.dp_cfg,
            rounds_left=self.train_cfg.rounds - start,
            prior_history=self.ledger.history_of_run(self.run_key) if start > 0 else [],
        )
        if self.compression:
            self._compressed = self._compression_state()
        self.audit.append(
            "job_start",
            job=self.job,
            run=self.run_key,
            encrypted=self.encrypt,
            dp=self.dp_cfg.enabled,
            policy_override=self.policy.simulated_override,
            compression=self.compression or None,
        )

    def _compression_state(self) -> CompressedSite:
        """The site's compressed-round state, keyed by a secret only the sites share (derived from the
        federation's CKKS secret key and the run key), so the server cannot tell which coordinates are
        sent. Without encryption the server sees every value anyway, and the run key does."""
        fraction = self.compression
        if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
            raise SiteRefusal(f"{self.site}: job setting compression={fraction!r} is not a fraction in (0, 1]; refused")
        key, self._slots = self.run_key, None
        if self._ctx is not None:
            from clinfed.he.ckks import slot_count
            from clinfed.he.context import site_secret

            key, self._slots = site_secret(self._ctx, f"compression|{self.run_key}").hex(), slot_count(self._ctx)
        return CompressedSite(key, float(fraction), self.site, slots=self._slots)

    def _admit(self) -> dict:
        """Accept or refuse the whole job once: its planned spend against what is left of the budget."""
        if self._admission is None:
            planned = self._trainer.planned_job() if self.dp_cfg.enabled else []
            projected = self.ledger.admit(self.policy.epsilon_budget, planned)
            own = self.ledger.epsilon_of_run_if(self.run_key, planned)  # the run's whole ε, earlier spends too
            if own > self.policy.max_job_epsilon * (1 + 1e-9):
                raise SiteRefusal(
                    f"{self.site}: run {self.run_key} would reach ε {own:.2f} > this site's max_job_epsilon "
                    f"{self.policy.max_job_epsilon:g} (with what it spent before); refusing the whole job"
                )
            self._admission = {
                "status": "accepted",
                "reason": "",
                "weight": self._sample_weight(),  # public, as in FLARE's FedAvg: the server sums the shares' base
                # the noise DP-SGD puts in one round's change here (public: it follows from the job's settings)
                "update_noise_std": self._trainer.update_noise_std(),
                "planned_epsilon": self.ledger.epsilon_of_run_if(self.run_key, planned),
                "projected_site_epsilon": projected,
            }
            if self._secagg is not None:
                self._admission[HELLO_KEY] = self._secagg.hello()
            self.audit.append("job_admitted", job=self.job, run=self.run_key, projected_epsilon=projected)
        if self._admission["status"] != "accepted":
            raise SiteRefusal(self._admission["reason"])
        return self._admission

    def _sample_weight(self) -> float:
        return len(self._trainer.data.train) / self.weight_unit

    def _compact_spec(self, text: str):
        """The job's CompactSpec as the server sent it, if this site can use it (ValueError otherwise):
        pooled, on this federation's key's parameters (the fixed grid, or a width of the noise-tied
        grid's ladder). A wrong bound or quantum costs only accuracy, never privacy."""
        from clinfed.he.compact import COMPACT_PARAMS, GRID_LADDER, CompactSpec

        spec = CompactSpec.from_json(text)
        known = GRID_LADDER if spec.stochastic else (COMPACT_PARAMS,)
        if not spec.pooled or spec.params not in known:
            raise ValueError(f"{self.site}: the job's compact spec is not the pooled format on this federation's key")
        return spec

    def _grid_spec(self):
        """This round's spec if it is the noise-tied grid (the site then sends its change), else None."""
        if self._compressed is not None or self._wire is None or not self.encrypt:
            return None
        spec = self._compact_spec(self._wire[0])
        return spec if spec.stochastic else None

    def _base_path(self, round_num: int) -> Path:
        folder = self.root / "grid"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder / f"{hashlib.sha256(self.run_key.encode()).hexdigest()[:24]}-{round_num}.npz"

    def _keep_base(self, round_num: int) -> None:
        """Keep the global model this round trains from: the change is sent against it, and the round's
        sum (an average change) is added back to it. On disk too (written atomically; the site holds
        this model anyway), the last two rounds', so a re-created executor or a restarted site
        continues, and so does a server that resumes from the round before the one it died in."""
        weights = {k: np.array(v, copy=True) for k, v in self._trainer.get_weights().items()}
        self._base = (round_num, weights)
        path = self._base_path(round_num)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, **weights)
        os.replace(tmp, path)
        for old in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.npz"):
            kept = old.stem.rsplit("-", 1)[1]
            if kept.isdigit() and int(kept) < round_num - 1:
                old.unlink(missing_ok=True)

    def _base_for(self, round_num: int) -> dict[str, np.ndarray]:
        """The global model round ``round_num`` trained from (SiteRefusal if this site does not hold it)."""
        if self._base is not None and self._base[0] == round_num:
            return self._base[1]
        path = self._base_path(round_num)
        if not path.exists():
            raise SiteRefusal(
                f"{self.site}: the noise-tied grid sends changes from round {round_num}'s global model, which this "
                "site does not hold; it cannot rebuild the model from that round's sum"
            )
        with np.load(path) as data:
            return {k: data[k] for k in data.files}

    # --- the global model in ---------------------------------------------------------------------
    def _check_encrypted(self, params: dict) -> None:
        if self._ctx is None:
            raise ValueError(f"{self.site}: received an encrypted model but this job runs without encryption")
        fingerprint = str(params.get(payload.FINGERPRINT_KEY, ""))
        if fingerprint != self._fingerprint:
            raise ValueError(
                f"{self.site}: the global model was encrypted under another key (fingerprint "
                f"{fingerprint[:12]}…, this site's {self._fingerprint[:12]}…); refusing it"
            )

    def _unmasked(self, params: dict, meta: dict, before_round: int, truncated: bool = False) -> object:
        """The sum's ciphertexts with the members' self-masks removed as they are read, after checking
        every member's signed reveal for exactly this sum (`SiteSecAgg.correction`)."""
        from clinfed.he.masking import MaskedStream, ring_of

        info = (meta or {}).get(SUM_KEY)
        ring = ring_of(self._ctx)
        correction = MaskedStream(self._secagg.correction(info, ring, purpose="train"))
        if int(info["round"]) >= before_round:
            raise SiteRefusal(
                f"{self.site}: the server sent round {info['round']}'s sum as the model of round {before_round}"
            )
        cts = params[payload.CKKS_KEY]
        if truncated:  # a compressed sum on the compact key (he.truncated)
            from clinfed.he.truncated import truncated_unmasked

            return truncated_unmasked(self._ctx, cts, correction)
        if params.get(payload.COMPACT_KEY):
            from clinfed.he.compact import compact_unmasked

            return compact_unmasked(self._ctx, cts, correction)
        from clinfed.he.ckks import real_unmasked

        return real_unmasked(self._ctx, cts, correction)

    def _load_global(self, model: FLModel) -> None:
        if self._compressed is not None:
            self._load_compressed(model)
            return
        params = model.params or {}
        if not params:
            return  # round 0: every site starts from the same seeded initialisation
        if payload.is_encrypted(params):
            self._check_encrypted(params)
            unmasked = self._unmasked(params, model.meta, int(model.current_round or 0))
            params = {**params, payload.CKKS_KEY: unmasked}
            from clinfed.he.aggregation import decrypt_average
            from clinfed.he.packing import layout_from_json

            total = float(model.meta.get("total_weight", 0.0))
            if total <= 0:
                raise ValueError(f"{self.site}: encrypted global model carries no total weight")
            layout = layout_from_json(params[payload.LAYOUT_KEY])
            if params.get(payload.COMPACT_KEY):  # exact integers: no flooding needed (he.compact)
                from clinfed.he.compact import compact_decrypt_average

                spec = self._compact_spec(str(params[payload.COMPACT_KEY]))
                weights = compact_decrypt_average(self._ctx, params[payload.CKKS_KEY], total, layout, spec)
                if spec.stochastic:  # the sum is the round's average change: add it to that round's model
                    info = (model.meta or {}).get(SUM_KEY) or {}
                    of = int(info["round"]) if "round" in info else int(model.current_round or 0) - 1
                    base = self._base_for(of)
                    weights = {k: (base[k] + v).astype(base[k].dtype) for k, v in weights.items()}
            else:
                weights = decrypt_average(self._ctx, params[payload.CKKS_KEY], total, layout)
        else:
            weights = {k: np.asarray(v) for k, v in params.items()}
        self._trainer.set_weights(weights)

    def _load_compressed(self, model: FLModel) -> None:
        """Bring this site's own copy of the global model up to the server's latest sum (once per sum)."""
        from clinfed.he.packing import flatten, unflatten

        comp, params, meta = self._compressed, model.params or {}, model.meta or {}
        if comp.base is None:
            if params:
                raise SiteRefusal(
                    f"{self.site}: a compressed run's global model lives only at the sites that built it from "
                    "round 0; this site cannot join it mid-way or resume it after a restart; refusing"
                )
            vec, self._model_layout = flatten(self._trainer.get_weights())  # the seeded initialisation
            comp.start(vec)
        sum_round = int(meta.get(payload.SUM_ROUND_KEY, -1)) if params else -1
        comp.settle(sum_round, list(meta.get(payload.CONTRIBUTORS_KEY) or []))
        if params and sum_round > comp.applied_round:
            average, exact = self._decrypt_compressed(params, meta)
            after = int(meta.get(payload.AFTER_ROUND_KEY, -1))
            comp.apply(sum_round, after, str(meta.get(payload.DIGEST_KEY, "")), average, exact)
        self._trainer.set_weights(unflatten(comp.base, self._model_layout))

    def _decrypt_compressed(self, params: dict, meta: dict) -> tuple[np.ndarray, np.ndarray]:
        """(the round's average change at its k coordinates, noise-flooded; the exact sum, only for
        ranking next round's coordinates: flooding differs per decryption, the exact sum does not)."""
        if not payload.is_encrypted(params):
            average = np.asarray(params.get(LAYER, []), dtype=np.float64).reshape(-1)
            return average, average
        self._check_encrypted(params)
        from clinfed.he.aggregation import decrypt_sum_exact, flood
        from clinfed.he.packing import layout_from_json

        before = int(meta.get(payload.SUM_ROUND_KEY, -1)) + 1
        truncated = bool(params.get(payload.COMPACT_KEY))
        params = {**params, payload.CKKS_KEY: self._unmasked(params, meta, before, truncated)}

        total = float(meta.get("total_weight", 0.0))
        if not (math.isfinite(total) and total > 0):
            raise ValueError(f"{self.site}: encrypted global update carries no total weight")
        layout = layout_from_json(params[payload.LAYOUT_KEY])
        if LAYER not in layout.names:
            raise ValueError(f"{self.site}: expected a compressed global update, got layers {list(layout.names)[:3]}")
        if truncated:  # exact integers on the job's grid: identical at every site, no flooding needed
            from clinfed.he.truncated import truncated_decrypt_average

            spec = self._compact_spec(str(params[payload.COMPACT_KEY]))
            average = truncated_decrypt_average(self._ctx, params[payload.CKKS_KEY], layout.size, total, spec)
            return average, average
        vec, _ = decrypt_sum_exact(self._ctx, params[payload.CKKS_KEY], layout)  # refuses < 3 contributors
        start, stop = layout.offsets()[LAYER]
        exact = vec[start:stop]
        return flood(exact) / total, exact

    # --- the update out ------------------------------------------------------------------------
    def _encode_update(
        self, weights: dict[str, np.ndarray], n_train: int, round_num: int = 0
    ) -> tuple[dict, float, dict]:
        """(params, aggregation weight, extra meta). Compressed, the arrays sent are the k values at the
        round's shared coordinates (checked for NaN first, so a poisoned update never enters the error
        feedback). What is encrypted is kept until the round is unmasked (a re-run masks it again)."""
        weights, extra = self._compress(weights, round_num)
        if self._secagg is not None:
            self._kept = (round_num, weights, n_train, extra)
        return self._encrypt_update(dict(weights), n_train, round_num, dict(extra))

    def _compress(self, weights: dict[str, np.ndarray], round_num: int) -> tuple[dict, dict]:
        for name, arr in weights.items():
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{self.site}: local update has NaN/Inf in '{name}'; refusing to send it")
        extra: dict = {}
        if self._compressed is not None:
            from clinfed.he.packing import flatten

            # compact jobs send exactly ⌈F·P⌉ values (he.truncated: bytes grow with k); the real-valued
            # path fills its last ciphertext, whose slots cost the same bytes used or not
            self._compressed.slots = None if self._wire is not None else getattr(self, "_slots", None)
            values, digest = self._compressed.encode(round_num, flatten(weights)[0])
            if self._wire is not None:  # the job's public bound; the excess waits in the error feedback
                bound = self._compact_spec(self._wire[0]).value_bound
                clipped = np.clip(values, -bound, bound)
                if not np.array_equal(clipped, values):
                    self._compressed.hold_back(values - clipped)
                    over = int(np.count_nonzero(clipped != values))
                    self.audit.append("update_clipped", job=self.job, round=round_num, values=over, bound=bound)
                    values = clipped
            weights = {LAYER: values}
            extra[payload.DIGEST_KEY] = digest
            extra["compression"] = {
                "fraction": self._compressed.fraction,
                "k": int(values.size),  # ⌈F·P⌉ (real-valued path: rounded up to fill the last ciphertext)
                "k_nominal": math.ceil(self._compressed.fraction * self._compressed.size),
                "size": self._compressed.size,
            }
        return weights, extra

    def _encrypt_update(self, weights: dict, n_train: int, round_num: int, extra: dict) -> tuple[dict, float, dict]:
        if not self.encrypt:
            return weights, float(n_train), extra
        if self._compressed is None and self._wire is not None:
            return self._encode_compact(weights, n_train, round_num)
        if self._wire is not None:
            return self._encode_truncated(weights, n_train, round_num, extra)
        from clinfed.he.aggregation import weighted_encrypt
        from clinfed.he.ckks import expected_ciphertext_count
        from clinfed.he.packing import layout_to_json

        weight = n_train / self.weight_unit
        # straight to this round's on-disk spool when the update will be streamed (fl.streaming)
        spool = streaming.Spool(self._spool_dir()) if self._cell is not None else None
        cts, layout = weighted_encrypt(
            self._ctx, weights, weight, sites=self.num_sites, into=spool, mask=self._mask(round_num)
        )
        if "compression" in extra:  # +1: the contributor count travels in every upload
            extra["compression"]["format"] = "real"
            extra["compression"]["ciphertexts"] = len(cts)
            extra["compression"]["dense_ciphertexts"] = expected_ciphertext_count(self._ctx, self._compressed.size + 1)
        return payload.encrypted_params(cts, layout_to_json(layout), self._fingerprint), weight, extra

    def _mask(self, round_num: int):
        """This upload's secure-aggregation mask, for the member set the task names (None only for an
        executor driven without a job, as the format's unit tests do: `_setup` always makes one)."""
        from clinfed.he.masking import MaskedStream, ring_of

        if self._secagg is None:
            return None
        return MaskedStream(self._secagg.mask(round_num, "train", self._members, ring_of(self._ctx)))

    def _share(self, n_train: int) -> tuple[str, object, float]:
        """(the job's spec JSON, the spec, this site's share of the admitted total weight)."""
        spec_json, admitted = self._wire
        spec = self._compact_spec(spec_json)
        own = n_train / self.weight_unit
        if not (math.isfinite(admitted) and admitted > 0 and own <= admitted * (1 + 1e-9)):
            raise ValueError(
                f"{self.site}: the server's admitted weight total {admitted!r} is below this site's own weight "
                f"{own:g}; refusing to encrypt a share above the whole (it would overflow the sum)"
            )
        return spec_json, spec, min(own / admitted, 1.0)

    def _encode_truncated(self, weights: dict, n_train: int, round_num: int, extra: dict) -> tuple[dict, float, dict]:
        """The compressed update on the compact key and grid (`clinfed.he.truncated`): the k values,
        times this site's share, in the first ⌈(k+1)/2⌉ coefficients of c0."""
        from clinfed.he.packing import layout_of, layout_to_json
        from clinfed.he.truncated import dense_compact_upload_bytes, truncated_encrypt

        spec_json, spec, share = self._share(n_train)
        clipped = np.asarray(weights[LAYER], dtype=np.float64)  # within the bound: see _compress
        spool = streaming.Spool(self._spool_dir()) if self._cell is not None else None
        cts = truncated_encrypt(self._ctx, clipped, share, spec, into=spool, mask=self._mask(round_num))
        if "compression" in extra:
            size = self._compressed.size
            extra["compression"].update(
                format="truncated",
                ciphertexts=len(cts),
                dense_ciphertexts=-(-(size + 1) // spec.params.values_per_ciphertext),
                dense_upload_bytes=dense_compact_upload_bytes(size, spec.params),
            )
        layout = layout_to_json(layout_of({LAYER: clipped}))
        return payload.encrypted_params(cts, layout, self._fingerprint, spec_json), share, extra

    def _encode_compact(self, weights: dict[str, np.ndarray], n_train: int, round_num: int) -> tuple[dict, float, dict]:
        """The dense update in the compact format: the site's share of the admitted total weight,
        values clipped to the job's public bound, encrypted straight into this round's spool. On the
        noise-tied grid the update is the change from the round's global model (`_keep_base`)."""
        from clinfed.he.compact import clamp_update, compact_encrypt
        from clinfed.he.packing import layout_to_json

        spec_json, spec, share = self._share(n_train)
        if spec.stochastic:
            base = self._base_for(round_num)
            weights = {k: np.subtract(v, base[k], dtype=np.float32) for k, v in weights.items()}
        weights, clipped = clamp_update(weights, spec)
        if clipped:  # post-processing of the DP-trained model: the count only, never a value
            self.audit.append("update_clipped", job=self.job, round=round_num, values=clipped, bound=spec.value_bound)
        spool = streaming.Spool(self._spool_dir()) if self._cell is not None else None
        cts, layout = compact_encrypt(self._ctx, weights, share, spec, into=spool, mask=self._mask(round_num))
        extra = {"clamped_values": clipped} if spec.stochastic else {}
        return payload.encrypted_params(cts, layout_to_json(layout), self._fingerprint, spec_json), share, extra

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in SITE_TASKS:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        round_num = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0)
        site = self.site = fl_ctx.get_identity_name()
        try:
            incoming = FLModelUtils.from_shareable(shareable)
            self._setup(fl_ctx, incoming)
            self._cell = fl_ctx.get_engine().get_cell()
            payload.record_anchor(self.audit, incoming.meta, job=self.job, round_num=round_num, peer="server")
            if task_name == ADMIT_TASK:
                payload.check_own_anchor(self.audit, incoming.meta, site)  # a rolled-back folder refuses (issue 23)
                return self._reply(FLModel(params={}, meta=dict(self._admit())))
            if task_name == ROC_TASK:  # the pooled ROC of the model validate scored (fl.roc_validation)
                return self._reply(self._roc().handle(incoming.meta or {}, incoming.params or {}))
            if self._secagg is not None:
                done = self._secure_aggregation_step(task_name, incoming.meta or {}, round_num)
                if done is not None:
                    return self._reply(done)
            spec = (incoming.meta or {}).get(payload.COMPACT_KEY)
            admitted = (incoming.meta or {}).get(payload.ADMITTED_WEIGHT_KEY)
            self._wire = (str(spec), float(admitted or 0.0)) if spec else None
            if streaming.is_streamed(incoming.params):  # the global model: pulled from the server's stream
                incoming.params, _ = streaming.receive(
                    self._cell, incoming.params, "server", self._spool_dir(), abort_signal
                )
            try:
                self._guard_evaluation(task_name, round_num, incoming.params or {})
                self._load_global(incoming)
            finally:
                streaming.release(incoming.params)
            if task_name == VALIDATE_TASK:
                metrics = self.policy.release_metrics(self._trainer.evaluate())
                try:
                    self._keep_roc()
                except Exception as exc:  # the pooled ROC is then skipped for this site, never the validation
                    self.log_warning(fl_ctx, f"{site}: held-out scores for the ROC not kept: {one_line(exc)}")
                try:
                    self._save_report()
                except Exception as exc:  # a figure must never turn a good validation into a failure
                    self.log_warning(fl_ctx, f"{site}: example figure not written: {one_line(exc)}")
                return self._reply(FLModel(metrics=metrics, meta={"status": "ok", **self._privacy_meta()}))
            return self._reply(self._train(round_num, fl_ctx, abort_signal))
        except (SiteRefusal, BudgetExceeded, TooFewContributors) as exc:
            return self._status_reply("refused", one_line(exc, site), round_num, admission=task_name == ADMIT_TASK)
        except Exception as exc:  # a site-level failure is reported, never allowed to stall the round
            reason = one_line(exc, site)
            self.log_error(fl_ctx, reason)
            return self._status_reply("failed", reason, round_num, admission=task_name == ADMIT_TASK)

    def _reply(self, model: FLModel) -> Shareable:
        """Every reply carries this site's audit-chain head, which the server records (anchoring).
        An encrypted update moves to a spool on disk and leaves as a stream the server pulls when
        it gets to this site (fl.streaming): the reply itself is a few hundred bytes."""
        audit = getattr(self, "audit", None)
        if audit is not None:
            model.meta = {**(model.meta or {}), AUDIT_HEAD_KEY: list(audit.head)}
        cts = (model.params or {}).get(payload.CKKS_KEY)
        streamed = payload.is_encrypted(model.params) and self._cell is not None
        if streamed and streaming.worth_streaming(cts):
            spool = cts
            if not isinstance(spool, streaming.Spool):  # (a payload damaged by an injected fault is a list)
                spool = streaming.Spool(self._spool_dir())
                spool.extend(cts)
            try:
                model.params = streaming.offer(
                    self._cell, {**model.params, payload.CKKS_KEY: spool}, ["server"], spool.close
                )
            except Exception:
                spool.close()
                raise
        elif isinstance(cts, streaming.Spool):  # fits one message: it rides in the reply
            model.params = {**model.params, payload.CKKS_KEY: streaming.into_memory(cts)}
        return FLModelUtils.to_shareable(model)

    def _guard_evaluation(self, task_name: str, round_num: int, params: dict) -> None:
        """A site scores a global model at most once per planned round, and in an encrypted job only one
        it decrypted itself (issue 23, item 3).

        Why: the score of a model on this site's patients is a query on them. A server free to send any
        plaintext network, as often as it likes, turns accuracy into exact counts of test patients with
        x_j > t and binary-searches feature values. `train` scores the round's global model
        (`global_*` metrics) and `validate` the final one: together, one score per round of the job,
        rounds 0..rounds (the last is validate's). A decrypted model is a sum the contributor slot says
        holds ≥ 3 sites' updates (forging that slot is the secure-aggregation issue's to close).
        """
        if self.encrypt and params and not payload.is_encrypted(params) and not streaming.is_streamed(params):
            raise SiteRefusal(
                f"{self.site}: the server sent a plaintext model to an encrypted job; this site evaluates only a "
                "model it decrypted itself; refusing"
            )
        last = self.train_cfg.rounds
        if not 0 <= round_num <= last or (task_name == TRAIN_TASK and round_num >= last):
            if task_name == VALIDATE_TASK:
                raise SiteRefusal(f"{self.site}: validate for round {round_num}, not a round of this job; refusing")
            return  # train past the plan is refused by _train, with its own reason
        evaluated = self.__dict__.setdefault("_evaluated", set())
        if round_num in evaluated:
            raise SiteRefusal(
                f"{self.site}: the global model of round {round_num} was already evaluated here; a second score "
                "is a second query on this site's patients; refusing"
            )
        evaluated.add(round_num)

    def _spool_dir(self) -> Path:
        folder = self.root / "spool"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        return folder

    def _train(self, round_num: int, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        trainer = self._trainer
        if round_num >= self.train_cfg.rounds:
            raise SiteRefusal(
                f"{self.site}: round {round_num} is beyond the {self.train_cfg.rounds} rounds this job planned "
                "(and calibrated its noise for); refusing"
            )
        self._admit()  # a controller that skipped admission gets it here; a refusal raises
        nm, sr, planned_steps = trainer.planned_spend()
        if self.dp_cfg.enabled:
            self._guard_spend(round_num, nm, sr, planned_steps)
        global_metrics = trainer.evaluate()
        if self._grid_spec() is not None:
            self._keep_base(round_num)  # the change this round sends is measured from here
        if self.dp_cfg.enabled:
            # reserved before training: a concurrent job cannot spend the same budget meanwhile
            self.ledger.reserve(
                self.job,
                round_num,
                noise_multiplier=nm,
                sample_rate=sr,
                steps=planned_steps,
                run=self.run_key,
                budget=self.policy.epsilon_budget,
            )
        start = time.monotonic()
        stats = trainer.train_round()
        train_seconds = time.monotonic() - start
        local_metrics = trainer.evaluate()
        fault = faults.injected_fault(self.site)
        weights = trainer.get_weights()
        if fault == "crash":
            faults.crash_now()
        if fault == "nan":
            weights = faults.poison_weights(weights)
        params, weight, extra = self._encode_update(weights, len(trainer.data.train), round_num)
        del weights
        release_free_memory()  # the round's garbage back to the OS before RSS is read (see sysinfo)
        if fault in ("corrupt", "wrongshape"):
            params = faults.damage_payload(fault, params, seed=round_num)
        digest, size = payload.log_update(
            self.audit, "update_sent", params, job=self.job, round_num=round_num, site=self.site
        )
        metrics = self.policy.release_metrics(
            {
                **{f"global_{k}": v for k, v in global_metrics.items()},
                **local_metrics,
                "train_loss": stats["train_loss"],
                "train_seconds": train_seconds,
                "rss_mb": current_rss_mb(),
            }
        )
        meta = {
            "status": "ok",
            "weight": weight,
            "metrics": metrics,
            "bytes_sent": size,
            "sha256": digest,
            **extra,
            **self._privacy_meta(),
        }
        return FLModel(params=params, meta=meta, current_round=round_num)

    def _secure_aggregation_step(self, task_name: str, meta: dict, round_num: int) -> FLModel | None:
        """Join the roster the task carries; answer a re-run or a reveal here (None: go on with the task)."""
        if task_name in (REMASK_TASK, REVEAL_TASK) and faults.injected_fault(self.site) == "vanish":
            faults.crash_now()
        info = meta.get(SECAGG_KEY) or {}
        if not info and task_name == VALIDATE_TASK:
            return None  # nothing to join: a model that needs the roster's reveals is refused when unmasked
        if not info:
            raise SiteRefusal(f"{self.site}: an encrypted task without the secure-aggregation roster; refusing")
        self._secagg.join(info.get("roster"))
        self._members = list(info.get("members") or [])
        if task_name == REVEAL_TASK:
            reveal = self._secagg.reveal(round_num, "train", self._members)
            self._kept = None  # unmasked: nothing more is uploaded this round
            self.audit.append("secagg_reveal", job=self.job, round=round_num, members=sorted(self._members))
            return FLModel(params={}, meta={"status": "ok", "reveal": reveal}, current_round=round_num)
        if task_name == REMASK_TASK:
            return self._remask(round_num)
        return None

    def _remask(self, round_num: int) -> FLModel:
        """Members dropped out after this round's upload: the same update again, masked for the smaller
        set the task names (`SiteSecAgg.mask` checks it is a strict majority subset): one more
        encryption, no training and no spend."""
        if self._kept is None or self._kept[0] != round_num:
            raise SiteRefusal(f"{self.site}: asked to re-upload round {round_num}, whose update it no longer holds")
        _, weights, n_train, extra = self._kept
        params, weight, extra = self._encrypt_update(dict(weights), n_train, round_num, dict(extra))
        digest, size = payload.log_update(
            self.audit, "update_sent", params, job=self.job, round_num=round_num, site=self.site
        )
        meta = {"status": "ok", "weight": weight, "bytes_sent": size, "sha256": digest, "remasked": True, **extra}
        return FLModel(params=params, meta={**meta, **self._privacy_meta()}, current_round=round_num)

    def _guard_spend(self, round_num: int, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """One DP-SGD spend per (run, round), and a run's total within what admission accepted (item 4).

        Why: a server that sends round 0 again would otherwise get a fresh DP-trained update of the same
        data, charged again each time, until the site's lifetime budget is gone: far past the job's
        `max_job_epsilon`, which only admission checked. Within a job a repeated round is refused. A
        resubmission that resumes the run (after a server restart) is a new admission: it may train
        a round the dead server never aggregated, but admission bounds the run's whole ε, earlier
        spends included, by `max_job_epsilon` (`_admit`).
        """
        run = self.run_key
        trained: set = self.__dict__.setdefault("_charged_rounds", set())
        if round_num in trained:
            raise SiteRefusal(
                f"{self.site}: round {round_num} of run {run} was already trained and charged; refusing to train it "
                "again (one DP-SGD spend per round)"
            )
        admitted = float((self._admission or {}).get("planned_epsilon") or 0.0)
        after = self.ledger._total(
            self.ledger.spends_of_run(run), [(noise_multiplier, sample_rate, steps)]
        )  # this run's own ε by the ledger's composition rule
        if after > admitted * (1 + 1e-9) + 1e-12:
            raise SiteRefusal(
                f"{self.site}: this round would take run {run} to ε {after:.3f}, past the {admitted:.3f} admission "
                "accepted; refusing"
            )
        trained.add(round_num)

    def _roc(self) -> RocParty:
        """This site's part in the pooled ROC (encrypted jobs only: plaintext histograms would reach the server)."""
        if self._secagg is None:
            raise SiteRefusal(f"{self.site}: a pooled ROC needs an encrypted job; this one runs in plaintext")
        party = self.__dict__.get("_roc_party")
        if party is None:
            party = self._roc_party = RocParty(
                self.site, self._ctx, self._fingerprint, self._secagg, self.policy.min_cell, self.policy.min_sites,
                audit=self.audit, job=self.job, state_file=roc_state(secagg_state(self.root, self.run_key)),
            )  # fmt: skip
        return party

    def _keep_roc(self) -> None:
        """The validated model's held-out scores: their histogram for the ROC sum, the scores themselves
        into the site's own reports/ folder (they never leave it)."""
        trainer = self._trainer
        trainer.model.eval()
        scored = held_out_scores(trainer.task, trainer.network, trainer.data.test)
        if self._secagg is not None:
            self._roc().keep(scored, self.task)
        if scored is not None:
            write_scores(self.root / "reports" / f"{self.job}-{self.site}-heldout-scores.csv", *scored)

    def _save_report(self) -> None:
        """Tasks that can draw (segmentation) leave example predictions in the site's own reports/ folder:
        the images never leave the site; a person at the site (or the simulator's --out) looks at them."""
        save = getattr(self._trainer.task, "save_examples", None)
        if save is not None:
            folder = self.root / "reports"
            folder.mkdir(parents=True, exist_ok=True)
            name = f"{safe_job_label(self.job, self.site)}-{self.site}-examples.png"
            save(self._trainer.network, self._trainer.data.test, folder / name)

    def _privacy_meta(self) -> dict:
        """This job's spends only (its ε and the history that gives it) and the site's total: the
        site's other jobs' spends stay in its ledger."""
        ledger = getattr(self, "ledger", None)
        if ledger is None:  # the site failed before it could open its ledger
            return {}
        dp = getattr(self, "dp_cfg", None)
        run = getattr(self, "run_key", "")
        return {
            "epsilon": ledger.epsilon_of_run(run) if dp is not None and dp.enabled else 0.0,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "budget": self.policy.epsilon_budget,
            "history": ledger.history_of_run(run),
            "site_total_epsilon": ledger.epsilon(),
            "dp": bool(dp is not None and dp.enabled),
            "policy_override": self.policy.simulated_override,
            "noise_multiplier": self._trainer.noise_multiplier if self._trainer else None,
        }

    def _status_reply(self, status: str, reason: str, round_num: int, admission: bool = False) -> Shareable:
        meta = {"status": status, "reason": reason}
        if admission and status == "refused":
            self._admission = meta
        if getattr(self, "audit", None) is not None:
            self.audit.append(status, job=getattr(self, "job", ""), round=round_num, site=self.site, reason=reason)
            meta.update(self._privacy_meta())
        return self._reply(FLModel(params={}, meta=meta, current_round=round_num))
