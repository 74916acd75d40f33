"""The federated ROC of a trained model: summary.json's `roc`, from every site's held-out patients.

Why here and not in `validate`: the final `validate` task releases each site's own metrics (its AUC
on its own held-out set); a pooled ROC curve needs every patient's score, which must not leave a
site. So each site counts its held-out patients' scores in public bins (`analytics.roc.roc_site_local`)
and the histograms go through the same secure aggregation as the training uploads: one more sum,
purpose ``"roc"``, over the sites that validated, so the server sees only ciphertexts and one site
decrypts only the sum of ≥ 3 (and ≥ its policy's `min_sites`) sites' histograms.

The scores are those of the final global model *as the site decrypted it itself* for `validate`:
the histogram is built in that same task (`RocParty.keep`), so the model is scored once, and a
server cannot have the site score a model of its own choosing (`executor._guard_evaluation`).

Protocol (one task name, ``roc_release``; its meta's ``roc_step`` says which stage):

==========  ======================================================================================
upload      every site that validated: its histogram plus a contributor slot (1.0), CKKS-encrypted
            and masked for the member set the task names (`fl.secagg`); the server adds them.
remask      members dropped out: the survivors upload the same histogram for the smaller set.
reveal      every member of the final set reveals its self-mask seed for it, signed, once.
combine     the release site (the first member by name) unmasks and decrypts the sum, checks the
            contributor slot against the members the server names, and releases `roc_combine`'s
            block with small cells merged to the largest `min_cell` of the members' policies.
==========  ======================================================================================

A task without per-patient binary scores (segmentation's Dice) answers ``skipped`` and summary.json
says so; a plaintext job (``--no-encrypt``) releases no ROC (its histograms would reach the server
one site at a time).
"""

from __future__ import annotations

import csv
import math
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from nvflare.app_common.abstract.fl_model import FLModel

from clinfed.analytics.roc import DEFAULT_BINS, roc_combine, roc_site_local
from clinfed.errors import SiteRefusal
from clinfed.fl import payload
from clinfed.fl.secagg import (
    SECAGG_KEY,
    SUM_KEY,
    ServerRoster,
    SiteSecAgg,
    collect_reveals,
    complete_round,
    result_site,
    sum_info,
)
from clinfed.he.aggregation import MIN_CONTRIBUTORS
from clinfed.textio import one_line

ROC_TASK = "roc_release"
PURPOSE = "roc"  # what secure aggregation binds these sums to (with the run, round and members)
STEP_KEY = "roc_step"
STEPS = ("upload", "remask", "reveal", "combine")
ROC_KEY = "roc"  # reply meta of the combine step: the released block
MIN_CELL_KEY = "min_cell_policy"  # upload reply meta: the site's min_cell, which the release site honours
VEC_KEY = "roc"


def state_path(secagg_state: Path) -> Path:
    """Where a site keeps its held-out histogram for a run: beside the run's secure-aggregation state."""
    return secagg_state.with_name(secagg_state.stem + ".roc.npy")


def vector_size(n_bins: int = DEFAULT_BINS) -> int:
    """Values per upload: [negatives, positives, Σ score] per bin and the contributor slot."""
    return 3 * n_bins + 1


def _layout_json(size: int) -> str:
    from clinfed.he.packing import flatten, layout_to_json

    return layout_to_json(flatten({VEC_KEY: np.zeros(size)})[1])


def held_out_scores(task: Any, model: Any, test: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(scores in [0, 1], 0/1 labels) of `model` on the held-out set, or None for a task that has no
    per-patient binary score (its `scores` method is what says it has one)."""
    scores = getattr(task, "scores", None)
    if scores is None:
        return None
    s, y = scores(model, test)
    return np.asarray(s, dtype=float).ravel(), np.asarray(y).ravel().astype(int)


def write_scores(path: Path, scores: np.ndarray, labels: np.ndarray) -> Path:
    """The site's own held-out scores as CSV in its reports/ folder: they never leave the site; a person
    there (or the simulator's tests) can check the federated ROC against sklearn on them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["score", "label"])
        writer.writerows((f"{s:.9g}", int(y)) for s, y in zip(scores, labels, strict=True))
    return path


# --- site side ------------------------------------------------------------------------------------------
class RocParty:
    """One site's part: the histogram of its held-out scores (kept at `validate`), masked uploads, the
    reveal, and at the release site the decryption and the release."""

    def __init__(
        self,
        site: str,
        ctx: Any,
        fingerprint: str,
        secagg: SiteSecAgg,
        min_cell: int = 5,
        min_sites: int = MIN_CONTRIBUTORS,
        n_bins: int = DEFAULT_BINS,
        audit: Any = None,
        job: str = "",
        state_file: Path | None = None,
    ):
        """``state_file``: where the histogram outlives the executor (FLARE re-creates executors when more
        simulated sites than run at once take turns; the secure-aggregation state is kept alike)."""
        self.site, self.ctx, self.fingerprint, self.secagg = site, ctx, fingerprint, secagg
        self.audit, self.job = audit, job  # the site's audit log: every step, never a payload
        self.min_cell, self.min_sites, self.n_bins = int(min_cell), max(int(min_sites), MIN_CONTRIBUTORS), n_bins
        self.state_file = state_file
        self.vector: np.ndarray | None = None
        if state_file is not None and state_file.is_file():
            self.vector = np.load(state_file, allow_pickle=False)
        self.skip_reason = f"{site}: the final model was not validated here"

    def keep(self, scored: tuple[np.ndarray, np.ndarray] | None, task_name: str = "") -> None:
        """The histogram of the validated model's scores (None: the task has no binary score)."""
        if scored is None:
            self.vector = None
            self.skip_reason = f"{self.site}: task {task_name or '?'} has no per-patient binary score"
            return
        self.vector = np.concatenate([roc_site_local(*scored, n_bins=self.n_bins), [1.0]])
        if self.state_file is not None:  # 0600 and atomic, next to the run's secure-aggregation state
            folder = self.state_file.parent
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = folder / f".{self.state_file.name}.{secrets.token_hex(4)}.tmp"
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                np.save(out, self.vector, allow_pickle=False)
            os.replace(tmp, self.state_file)

    def handle(self, meta: dict, params: dict) -> FLModel:
        """Answer one `roc_release` task (its step in ``meta[STEP_KEY]``); refusals raise SiteRefusal."""
        reply = self._answer(meta, params)
        if self.audit is not None:
            info = meta.get(SECAGG_KEY) or {}
            self.audit.append(
                "roc_" + str(meta.get(STEP_KEY)),
                job=self.job,
                round=info.get("round"),
                members=sorted(info.get("members") or []),
                status=reply.meta.get("status"),
            )
        return reply

    def _answer(self, meta: dict, params: dict) -> FLModel:
        step = meta.get(STEP_KEY)
        if step not in STEPS:
            raise SiteRefusal(f"{self.site}: unknown ROC step {step!r}; refusing")
        info = meta.get(SECAGG_KEY) or {}
        rnd = int(info.get("round", -1))
        if step == "combine":
            return FLModel(params={}, meta={"status": "ok", ROC_KEY: self.combine(params, meta, rnd)})
        if self.vector is None:
            return FLModel(params={}, meta={"status": "skipped", "reason": self.skip_reason})
        if info.get("purpose") != PURPOSE:
            raise SiteRefusal(f"{self.site}: an ROC task for purpose {info.get('purpose')!r}; refusing")
        self.secagg.join(info.get("roster"))
        members = list(info.get("members") or [])
        if step == "reveal":
            return FLModel(params={}, meta={"status": "ok", "reveal": self.secagg.reveal(rnd, PURPOSE, members)})
        return FLModel(params=self._masked(rnd, members), meta={"status": "ok", MIN_CELL_KEY: self.min_cell})

    def _masked(self, rnd: int, members: list[str]) -> dict:
        """The histogram encrypted and masked for ``members`` (a re-run: the same one for a smaller set,
        which `SiteSecAgg.mask` allows only as a strict majority subset, never after the reveal)."""
        from clinfed.he.ckks import encrypt_vector
        from clinfed.he.masking import MaskedStream, ring_of

        mask = MaskedStream(self.secagg.mask(rnd, PURPOSE, members, ring_of(self.ctx)))
        cts = encrypt_vector(self.ctx, self.vector, mask=mask)
        return payload.encrypted_params(cts, _layout_json(self.vector.size), self.fingerprint)

    def combine(self, params: dict, meta: dict, rnd: int) -> dict:
        """Unmask (every member's signed reveal for this very set), decrypt, check the count, release."""
        from clinfed.he.ckks import decrypt_vector, real_unmasked
        from clinfed.he.masking import MaskedStream, ring_of

        if not payload.is_encrypted(params) or params.get(payload.FINGERPRINT_KEY) != self.fingerprint:
            raise SiteRefusal(f"{self.site}: the ROC sum is not a ciphertext under this federation's key; refusing")
        correction = MaskedStream(
            self.secagg.correction(meta.get(SUM_KEY), ring_of(self.ctx), expect_round=rnd, purpose=PURPOSE)
        )
        size = vector_size(self.n_bins)
        summed = decrypt_vector(self.ctx, real_unmasked(self.ctx, params[payload.CKKS_KEY], correction), size)
        named = sorted(set((meta.get(SUM_KEY) or {}).get("members") or []))
        raw = float(summed[-1])
        count = round(raw)
        if not math.isfinite(raw) or abs(raw - count) > 0.01:
            raise SiteRefusal(
                f"{self.site}: the ROC sum's count slot reads {raw:.4g}, not a whole number of sites (forged or "
                "partial); refusing"
            )
        if count < self.min_sites or count != len(named) or self.site not in named:
            raise SiteRefusal(
                f"{self.site}: the ROC sum holds {count} site histogram(s), the server names {len(named)}; this site "
                f"releases only a sum of ≥ {self.min_sites} sites that it is one of; refusing"
            )
        floor = max([self.min_cell, *(int(v) for v in [meta.get("min_cell")] if v is not None)])
        # counts are rounded to integers in roc_combine; the Σ score per bin carries CKKS error, which must
        # not be released (key recovery, docs/threat-model.md row 8): flooded, and the block rounded
        from clinfed.analytics.sums_fl import round_release
        from clinfed.he.aggregation import flood

        block = roc_combine(flood(summed[:-1]), self.n_bins, min_cell=floor)
        return {**round_release(block), "sites": named, "min_cell": floor}


# --- server side ----------------------------------------------------------------------------------------
#: ask(params, meta, targets, everyone) → the sites' replies (FLModels whose meta names `client_name`)
Ask = Callable[[dict, dict, list[str], bool], list[FLModel]]


def federated_roc(
    ask: Ask,
    roster: ServerRoster,
    ctx: Any,
    fingerprint: str,
    rnd: int,
    targets: list[str],
    n_bins: int = DEFAULT_BINS,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """summary.json's `roc`: the released block, or {"status": "skipped"/"withheld", "reason"}.

    The server only adds ciphertexts and forwards them with the members' reveals; ``ctx`` is its
    public context (no secret key: `EncryptedSum` refuses one)."""
    from clinfed.he.aggregation import EncryptedSum

    targets = sorted(targets)
    if len(targets) < MIN_CONTRIBUTORS:
        reason = f"{len(targets)} site(s) validated the final model (< {MIN_CONTRIBUTORS})"
        return {"status": "withheld", "reason": reason}
    size = vector_size(n_bins)
    layout = _layout_json(size)
    floors: dict[str, int] = {}

    def meta(step: str, members: list[str]) -> dict:
        return {STEP_KEY: step, SECAGG_KEY: roster.task(rnd, PURPOSE, members)}

    def add(results: list[FLModel], entries: dict[str, dict]) -> tuple[object, list[str]]:
        acc = EncryptedSum(ctx, fingerprint, size=size)
        for result in results:
            site, rmeta, params = result_site(result), result.meta or {}, result.params or {}
            status, reason = rmeta.get("status", "failed"), rmeta.get("reason", "")
            if status == "ok":
                try:
                    if not payload.is_encrypted(params) or params.get(payload.LAYOUT_KEY) != layout:
                        raise ValueError(f"{site}: its ROC histogram is not {size} encrypted values")
                    acc.add(site, params[payload.CKKS_KEY], 1.0, params.get(payload.FINGERPRINT_KEY, ""))
                    floors[site] = int(rmeta.get(MIN_CELL_KEY) or 1)
                except ValueError as exc:
                    status, reason = "failed", one_line(exc, site)
            if status != "ok" or site not in entries:
                entries[site] = {"status": status, "reason": reason}
        return acc, sorted(acc.sites)

    entries: dict[str, dict] = {}
    acc, ok = add(ask({}, meta("upload", targets), targets, False), entries)
    if not ok:
        skipped = [e["reason"] for e in entries.values() if e["status"] == "skipped" and e.get("reason")]
        if skipped:
            return {"status": "skipped", "reason": skipped[0]}
        return {"status": "withheld", "reason": "no site uploaded its ROC histogram", "sites": entries}

    def rerun(members: list[str]) -> tuple[object, list[str]]:
        log(f"ROC: the survivors {members} upload again for that set")
        return add(ask({}, meta("remask", members), members, False), entries)

    def reveal(members: list[str]) -> dict[str, dict]:
        return collect_reveals(ask({}, meta("reveal", members), members, True), members, entries)

    done = complete_round(targets, acc, ok, MIN_CONTRIBUTORS, rerun, reveal)
    if done.reason:
        log(f"ROC: {done.reason}")
        return {"status": "withheld", "reason": done.reason, "sites": entries}
    cts, _, _ = done.acc.result()
    release = done.members[0]
    combine_meta = {
        **meta("combine", done.members),
        SUM_KEY: sum_info(rnd, PURPOSE, done.members, done.reveals or {}),
        "min_cell": max(floors.get(s, 1) for s in done.members),
    }
    sum_params = payload.encrypted_params(list(cts), layout, fingerprint)
    answers = ask(sum_params, combine_meta, [release], True)
    reply = next((r.meta or {} for r in answers if result_site(r) == release), {})
    if reply.get("status") != "ok" or not isinstance(reply.get(ROC_KEY), dict):
        reason = reply.get("reason") or f"{release}: no answer to the ROC release"
        return {"status": "withheld", "reason": reason, "sites": entries}
    return {"status": "ok", **reply[ROC_KEY], "release_site": release}
