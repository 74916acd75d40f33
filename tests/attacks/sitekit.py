"""Driving one site's real executor task by task, as FLARE would (real FLContext, Shareable, TenSEAL
keys, Opacus, the site's ledger and audit log on disk), with the server's messages written by the
attacker: what a malicious server can send a site, without a simulator run."""

from __future__ import annotations

from pathlib import Path

from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.utils.fl_model_utils import FLModelUtils

from clinfed.fl.participant import SIM_ROOT_ENV


def site_ctx(site: str, job_id: str = "job-1") -> FLContext:
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=False)
    return ctx


class _NoCellEngine:
    """Only `get_cell` is asked of the engine outside the simulator: no cell, so no streaming."""

    def get_cell(self):
        return None


def send(executor, task: str, model: FLModel, site: str = "site-1", job_id: str = "job-1") -> FLModel:
    """One task to `executor` as FLARE delivers it; its reply as an FLModel."""
    shareable: Shareable = FLModelUtils.to_shareable(model)
    shareable.set_header(AppConstants.CURRENT_ROUND, model.current_round or 0)
    ctx = site_ctx(site, job_id)
    ctx.get_engine = lambda: _NoCellEngine()  # the one engine call a site makes outside streaming
    reply = executor.execute(task, shareable, ctx, Signal())
    return FLModelUtils.from_shareable(reply)


def sim_root(monkeypatch, root: Path, sites: list[str]) -> Path:
    """Participant folders under `root` (as `clinfed simulate` lays them out), with the federation's keys."""
    from clinfed.simulate import ensure_contexts

    monkeypatch.setenv(SIM_ROOT_ENV, str(root))
    ensure_contexts(root, sites)
    return root
