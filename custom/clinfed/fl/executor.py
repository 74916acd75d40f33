"""The site side of a round: decrypt the global model, train with DP-SGD, encrypt the update.

`DPTrainExecutor` is a FLARE Executor configured entirely by JSON-able arguments (task name, training
and DP settings); the learning itself lives in `clinfed.training` and `clinfed.tasks`, the
cryptography in `clinfed.he`. It never raises into FLARE for a site-level problem: a refusal (budget
spent, policy) or a failure (bad data, NaN update) is returned as a result with a status and a one-line
reason naming the site, so the server can report it and the round can go on with the others.
"""

from __future__ import annotations

import time

import numpy as np
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from clinfed import faults
from clinfed.audit import AuditLog
from clinfed.errors import SiteRefusal
from clinfed.fl import payload
from clinfed.fl.participant import SitePolicy, participant_root, site_context, site_index
from clinfed.privacy.ledger import LEDGER_FILE, BudgetExceeded, PrivacyLedger
from clinfed.sysinfo import current_rss_mb
from clinfed.tasks import build_task
from clinfed.training import DPConfig, SiteTrainer, TrainConfig

TRAIN_TASK = "train"
VALIDATE_TASK = "validate"


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
        inject: dict | None = None,
    ):
        """
        Args:
            task: name in `clinfed.tasks.TASKS`.
            task_args / train_args / dp_args: keyword arguments of the task, `TrainConfig`, `DPConfig`.
            encrypt: send CKKS ciphertexts (default) rather than plaintext weights.
            num_sites: federation size, used only to pick this site's part of the bundled demo data.
            weight_unit: aggregation weights are sample counts divided by this, keeping packed values
                small enough for the CKKS precision headroom (see `clinfed.he.params`).
            job_label: the job name recorded in the ledger and audit log.
            inject: {site: fault kind} for tests and demos only (see `clinfed.faults`).
        """
        super().__init__()
        # FedJob serialises a component from the attributes named like its __init__ arguments:
        # keep every argument under its own name, or it silently falls back to the default.
        self.task, self.task_args = task, dict(task_args or {})
        self.train_args, self.dp_args = dict(train_args or {}), dict(dp_args or {})
        self.train_cfg = TrainConfig(**self.train_args)
        self.dp_cfg = DPConfig(**self.dp_args)
        self.encrypt, self.num_sites, self.weight_unit = encrypt, num_sites, weight_unit
        self.job_label = job_label
        self.inject = dict(inject or {})
        self._trainer: SiteTrainer | None = None
        self._ctx = None
        self._fingerprint = ""

    # --- state that lives for the whole job at this site -------------------------------------------
    def _setup(self, fl_ctx: FLContext, incoming: FLModel) -> None:
        if self._trainer is not None:
            return
        self.site = fl_ctx.get_identity_name()
        self.root = participant_root(fl_ctx)
        self.policy = SitePolicy.load(self.root)
        self.audit = AuditLog(self.root, self.site)
        self.ledger = PrivacyLedger(self.root / "local" / LEDGER_FILE, self.site, delta=self.dp_cfg.delta)
        self.job = self.job_label or fl_ctx.get_job_id()
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
        # A job resumed after a server restart continues its first run: count what that run spent.
        self.run_key = str(incoming.meta.get("run_key", "")) or fl_ctx.get_job_id()
        start = int(incoming.current_round or 0)
        self._trainer = SiteTrainer(
            task,
            data,
            self.train_cfg,
            self.dp_cfg,
            rounds_left=self.train_cfg.rounds - start,
            prior_history=self.ledger.history_of_run(self.run_key) if start > 0 else [],
        )
        self.audit.append("job_start", job=self.job, encrypted=self.encrypt, dp=self.dp_cfg.enabled)

    # --- the global model in ---------------------------------------------------------------------
    def _load_global(self, model: FLModel) -> None:
        params = model.params or {}
        if not params:
            return  # round 0: every site starts from the same seeded initialisation
        if payload.is_encrypted(params):
            if self._ctx is None:
                raise ValueError(f"{self.site}: received an encrypted model but this job runs without encryption")
            from clinfed.he.aggregation import decrypt_average
            from clinfed.he.packing import layout_from_json

            total = float(model.meta.get("total_weight", 0.0))
            if total <= 0:
                raise ValueError(f"{self.site}: encrypted global model carries no total weight")
            weights = decrypt_average(
                self._ctx, params[payload.CKKS_KEY], total, layout_from_json(params[payload.LAYOUT_KEY])
            )
        else:
            weights = {k: np.asarray(v) for k, v in params.items()}
        self._trainer.set_weights(weights)

    # --- the update out ------------------------------------------------------------------------
    def _encode_update(self, weights: dict[str, np.ndarray], n_train: int) -> tuple[dict, float]:
        for name, arr in weights.items():
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{self.site}: local update has NaN/Inf in '{name}'; refusing to send it")
        if not self.encrypt:
            return weights, float(n_train)
        from clinfed.he.aggregation import weighted_encrypt
        from clinfed.he.packing import layout_to_json

        weight = n_train / self.weight_unit
        cts, layout = weighted_encrypt(self._ctx, weights, weight, sites=self.num_sites)
        return payload.encrypted_params(cts, layout_to_json(layout), self._fingerprint), weight

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in (TRAIN_TASK, VALIDATE_TASK):
            return make_reply(ReturnCode.TASK_UNKNOWN)
        round_num = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0)
        site = self.site = fl_ctx.get_identity_name()
        try:
            incoming = FLModelUtils.from_shareable(shareable)
            self._setup(fl_ctx, incoming)
            self._load_global(incoming)
            if task_name == VALIDATE_TASK:
                metrics = self._trainer.evaluate()
                try:
                    self._save_report()
                except Exception as exc:  # a figure must never turn a good validation into a failure
                    self.log_warning(fl_ctx, f"{site}: example figure not written: {exc}")
                return FLModelUtils.to_shareable(
                    FLModel(metrics=metrics, meta={"status": "ok", "epsilon": self.ledger.epsilon()})
                )
            return FLModelUtils.to_shareable(self._train(round_num, fl_ctx, abort_signal))
        except (SiteRefusal, BudgetExceeded) as exc:
            return self._status_reply("refused", str(exc), round_num)
        except Exception as exc:  # a site-level failure is reported, never allowed to stall the round
            reason = str(exc) if str(exc).startswith(site) else f"{site}: {type(exc).__name__}: {exc}"
            self.log_error(fl_ctx, reason)
            return self._status_reply("failed", reason.splitlines()[0], round_num)

    def _train(self, round_num: int, fl_ctx: FLContext, abort_signal: Signal) -> FLModel:
        trainer = self._trainer
        global_metrics = trainer.evaluate()
        nm, sr, planned_steps = trainer.planned_spend()
        if self.dp_cfg.enabled:
            self.ledger.check(self.policy.epsilon_budget, nm, sr, planned_steps)
        start = time.monotonic()
        stats = trainer.train_round()
        train_seconds = time.monotonic() - start
        if self.dp_cfg.enabled:
            spend = self.ledger.record(self.job, round_num, nm, sr, int(stats["steps"]), run=self.run_key)
            self.audit.append(
                "epsilon_spent",
                job=self.job,
                round=round_num,
                epsilon=spend.epsilon_after,
                delta=self.ledger.delta,
                noise_multiplier=nm,
                sample_rate=sr,
                steps=int(stats["steps"]),
            )
        local_metrics = trainer.evaluate()
        fault = self.inject.get(self.site)
        weights = trainer.get_weights()
        if fault == "crash":
            faults.crash_now()
        if fault == "nan":
            weights = faults.poison_weights(weights)
        params, weight = self._encode_update(weights, len(trainer.data.train))
        if fault in ("corrupt", "wrongshape"):
            params = faults.damage_payload(fault, params, seed=round_num)
        digest, size = payload.log_update(
            self.audit, "update_sent", params, job=self.job, round_num=round_num, site=self.site
        )
        metrics = {
            **{f"global_{k}": v for k, v in global_metrics.items()},
            **local_metrics,
            "train_loss": stats["train_loss"],
            "train_seconds": train_seconds,
            "rss_mb": current_rss_mb(),
        }
        meta = {
            "status": "ok",
            "weight": weight,
            "metrics": metrics,
            "bytes_sent": size,
            "sha256": digest,
            **self._privacy_meta(),
        }
        return FLModel(params=params, meta=meta, current_round=round_num)

    def _save_report(self) -> None:
        """Tasks that can draw (segmentation) leave example predictions in the site's own reports/ folder:
        the images never leave the site; a person at the site (or the simulator's --out) looks at them."""
        save = getattr(self._trainer.task, "save_examples", None)
        if save is not None:
            folder = self.root / "reports"
            folder.mkdir(parents=True, exist_ok=True)
            save(self._trainer.network, self._trainer.data.test, folder / f"{self.job}-{self.site}-examples.png")

    def _privacy_meta(self) -> dict:
        ledger = getattr(self, "ledger", None)
        if ledger is None:  # the site failed before it could open its ledger
            return {}
        return {
            "epsilon": ledger.epsilon() if self.dp_cfg.enabled else 0.0,
            "delta": ledger.delta,
            "accountant": ledger.accountant,
            "budget": self.policy.epsilon_budget,
            "history": ledger.history,
            "dp": self.dp_cfg.enabled,
            "noise_multiplier": self._trainer.noise_multiplier if self._trainer else None,
        }

    def _status_reply(self, status: str, reason: str, round_num: int) -> Shareable:
        meta = {"status": status, "reason": reason}
        if getattr(self, "audit", None) is not None:
            self.audit.append(status, job=getattr(self, "job", ""), round=round_num, site=self.site, reason=reason)
            meta.update(self._privacy_meta())
        return FLModelUtils.to_shareable(FLModel(params={}, meta=meta, current_round=round_num))
