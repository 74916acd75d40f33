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
    from clinfed.deploy.simkit import ensure_sim_kits
    from clinfed.simulate import ensure_contexts

    monkeypatch.setenv(SIM_ROOT_ENV, str(root))
    ensure_contexts(root, sites)
    ensure_sim_kits(root, sites)  # secure aggregation signs with the sites' kits
    return root


def roster(site_hello: dict, run: str, root: Path, sites: list[str], members: list[str] | None = None) -> dict:
    """The secure-aggregation part of a task to site-1 (`SECAGG_KEY`): its own signed key (from its admission
    reply) and the other sites' keys for the run, as an honest server forwards them."""
    from clinfed.fl.secagg import HELLO_KEY, SECAGG_KEY, load_site

    keys = {s: load_site(root / s, s, run).hello() for s in sites if s != "site-1"}
    keys["site-1"] = site_hello[HELLO_KEY]
    return {SECAGG_KEY: {"roster": keys, "members": sorted(members or sites)}}


# --- a clinical-sums federation: real SumsExecutors, the server's addition done by the attacker --------------
class SumsFederation:
    """Three (or more) sites' `SumsExecutor`s on one federation key, their data given as arrays, and the
    server's side written out: what a malicious server can send them, task by task."""

    def __init__(
        self, root: Path, method: dict, tables: dict[str, dict], min_cell: int = 5, run: str = "run-1", **policy
    ):
        from clinfed.analytics.registry import make_method
        from clinfed.analytics.sums_fl import SumsExecutor
        from clinfed.audit import AuditLog
        from clinfed.deploy.simkit import ensure_sim_kits
        from clinfed.fl.participant import SitePolicy
        from clinfed.fl.secagg import load_site
        from clinfed.he.context import context_fingerprint, create_context_pair

        self.secret, self.public = create_context_pair()
        self.fingerprint = context_fingerprint(self.secret)
        self.method, self.sites = method, {}
        self.digest = make_method(method).digest()
        ensure_sim_kits(root, list(tables))
        self._infos: dict = {}
        for name, table in tables.items():
            ex = SumsExecutor(method=method, num_sites=len(tables), min_cell=min_cell, job_label="job")
            ex.site, ex.root, ex.run_id = name, root / name, run
            (ex.root / "local").mkdir(parents=True, exist_ok=True)
            ex.policy = SitePolicy(**policy)
            ex.audit = AuditLog(ex.root, name)
            ex._ctx, ex._fingerprint = self.secret, self.fingerprint
            ex._m = make_method(method)
            ex._m.max_params_per_observation = getattr(ex.policy, "max_params_per_observation", 0.33)
            if hasattr(ex, "_load"):  # what `_setup` does with the rows it read
                ex._load(table)
            else:
                ex._data = ex._m.load(table, name, ex._min_cell({}))
            ex._ready = True
            ex._secagg = load_site(ex.root, name, run)
            self.sites[name] = ex
        self.roster = {s: ex._secagg.hello() for s, ex in self.sites.items()}

    def meta(self, phase: str, rnd: int, **extra) -> dict:
        return {"settings": self.digest, "phase": phase, "round": rnd, **extra}

    def sums(self, phase: str, rnd: int, sites: list[str], iterate: dict | None = None, **extra) -> dict[str, FLModel]:
        """Each named site's answer to `clinical_sums` (the server names `sites` as the ones asked)."""
        from clinfed.fl.secagg import SECAGG_KEY

        meta = self.meta(phase, rnd, sites=list(sites), **extra)
        meta[SECAGG_KEY] = {"roster": self.roster, "members": sorted(sites)}
        self._last = (rnd, sorted(sites))
        return {
            s: send(self.sites[s], "clinical_sums", FLModel(params=iterate or {}, meta=dict(meta)), site=s)
            for s in sites
        }

    def add(self, answers: dict[str, FLModel], phase: str) -> dict:
        """The server's encrypted sum of the answers, as `SumsController._sum_round` builds it."""
        from clinfed.analytics.registry import make_method
        from clinfed.analytics.sums_fl import _layout_json
        from clinfed.fl import payload
        from clinfed.he.aggregation import EncryptedSum

        m = make_method(self.method)
        size = m.wire_limbs * (m.size(phase) + 1)
        acc = EncryptedSum(self.public, self.fingerprint, size=size)
        for site, reply in answers.items():
            assert reply.meta["status"] == "ok", reply.meta.get("reason")
            acc.add(site, reply.params[payload.CKKS_KEY], 1.0, reply.params[payload.FINGERPRINT_KEY])
        cts, _, _ = acc.result()
        self._reveal(*self._last)
        return payload.encrypted_params(cts, _layout_json(size), self.fingerprint)

    def _reveal(self, rnd: int, members: list[str]) -> dict:
        """Every member's reveal for (round, members), asked once as an honest server does (secure aggregation)."""
        from clinfed.analytics.sums_fl import PURPOSE
        from clinfed.fl.secagg import sum_info

        key = (rnd, tuple(members))
        if key not in self._infos:
            reveals = {s: self.sites[s]._secagg.reveal(rnd, PURPOSE, members) for s in members}
            self._infos[key] = sum_info(rnd, PURPOSE, members, reveals)
        return self._infos[key]

    def step(self, site: str, phase: str, rnd: int, agg: dict, named: list[str], **extra) -> FLModel:
        from clinfed.fl.secagg import SECAGG_KEY, SUM_KEY

        meta = self.meta(phase, rnd, sites=list(named), **extra)
        meta[SECAGG_KEY] = {"roster": self.roster, "members": sorted(named)}
        info = self._infos.get((rnd, tuple(sorted(named))))
        if info is None and self._infos:  # the server names other sites than the sum's: it shows the last reveals
            info = list(self._infos.values())[-1]
        meta.setdefault(SUM_KEY, info)
        return send(self.sites[site], "clinical_step", FLModel(params=agg, meta=meta), site=site)
