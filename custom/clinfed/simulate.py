"""Run a bundled job in FLARE's own simulator, with each participant's keys and ledger in place.

The simulator is FLARE's (`SimEnv` → `FedJob.simulator_run`): real server and client runtimes, real
task dispatch and serialisation. What this module adds is what a provisioned kit would carry and
the simulator cannot: per-participant folders (see `clinfed.fl.participant`) holding the CKKS
contexts (secret at the sites, public at the server), the sites' privacy policy and ledgers, and
the audit logs, under `<workspace>/<participant>/`. FLARE's own simulator workspace is
`<workspace>/flare/<job>/`; the server's summary.json is copied to `<out>/summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from clinfed.fl.faults import INJECT_ENV, encode_faults
from clinfed.fl.participant import SERVER_CONTEXT_FILE, SIM_ROOT_ENV, SITE_CONTEXT_FILE, write_site_policy
from clinfed.jobs import load_job

ALLOW_LIST_PREFIX = "clinfed."


MAX_PARALLEL_SITES = 8


@dataclass
class SimulationRequest:
    job: str
    sites: int = 3
    rounds: int | None = None
    out: Path = Path("out")
    workspace: Path | None = None
    encrypt: bool = True
    epsilon: float | None = None
    no_dp: bool = False
    site_budget: float | None = None
    min_cell: int | None = None
    data_dir: str | None = None
    inject: dict[str, str] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    #: site processes running at once (FLARE's simulator threads); None: all sites up to
    #: `MAX_PARALLEL_SITES`, beyond which sites take turns in the same processes
    parallel: int | None = None

    @property
    def site_names(self) -> list[str]:
        return [f"site-{i}" for i in range(1, self.sites + 1)]


def ensure_contexts(root: Path, sites: list[str]) -> None:
    """One CKKS key pair per federation, generated once *at the first site* (a hospital, as in a
    deployment) and reused by every later run on this workspace; the server gets the public context.

    Copying the first site's key to the others stands in for what a deployment does through the
    federation (`clinfed.keys`: the key travels encrypted to each site's kit certificate); there is no
    operator copy.
    """
    from clinfed.he.context import write_context_pair

    holder = root / sites[0] / "local" / SITE_CONTEXT_FILE
    server_ctx = root / "server" / "local" / SERVER_CONTEXT_FILE
    if not holder.exists() or not server_ctx.exists():
        write_context_pair(holder, server_ctx)
    for site in sites[1:]:
        target = root / site / "local" / SITE_CONTEXT_FILE
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(holder, target)
            os.chmod(target, 0o600)


def allow_clinfed_components(flare_ws: Path) -> None:
    """Admit clinfed's classes in the simulator's component allow-list (FLARE's defaults + `clinfed.`)."""
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
    from nvflare.app_common.widgets.component_path_authorizer import CLASS_ALLOW_LIST

    local = flare_ws / "local"
    local.mkdir(parents=True, exist_ok=True)
    path = local / "resources.json"
    data = json.loads(path.read_text()) if path.exists() else {"format_version": 2}
    data[CLASS_ALLOW_LIST] = [*DEFAULT_CLASS_ALLOW_LIST, ALLOW_LIST_PREFIX]
    path.write_text(json.dumps(data, indent=2))


def prepare_participants(req: SimulationRequest, root: Path) -> None:
    if req.encrypt:
        from clinfed.deploy.simkit import ensure_sim_kits

        ensure_contexts(root, req.site_names)
        ensure_sim_kits(root, req.site_names)  # secure aggregation signs with the sites' kits
    (root / "server").mkdir(parents=True, exist_ok=True)
    for site in req.site_names:
        # `--no-dp` is a simulator-only *policy* override (the job alone cannot switch DP off); it is
        # written to the simulated sites' own policy and stated in summary.json and the output.
        # `--min-cell` likewise: the site policy owns the floor (a job may only raise it), and in the
        # simulator the person running it stands for the hospitals too.
        write_site_policy(
            root / site,
            epsilon_budget=req.site_budget,
            data_dir=req.data_dir,
            require_dp=not req.no_dp,
            simulated_override=req.no_dp,
            min_cell=req.min_cell,
        )


@contextlib.contextmanager
def stopping_children_on_exit() -> Iterator[None]:
    """Ctrl-C or SIGTERM during a simulation stops every process it started. FLARE's simulator runs
    its server and site workers in sessions of their own, so when only `clinfed simulate` is killed
    they are reparented to init and keep running (measured: a simulator and two site workers alive an
    hour after their parent was killed). SIGTERM becomes KeyboardInterrupt here; on the way out the
    process tree (still known while this process lives) is terminated, then killed after 10 s."""
    import psutil

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, interrupt) if main else None
    try:
        yield
    except BaseException:
        children = psutil.Process().children(recursive=True)
        for child in children:
            with contextlib.suppress(psutil.Error):
                child.terminate()
        _, alive = psutil.wait_procs(children, timeout=10)
        for child in alive:
            with contextlib.suppress(psutil.Error):
                child.kill()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _never_started(summary_path: Path) -> list[str]:
    """Sites that never answered admission in a run where nothing was trained or released."""
    if not summary_path.is_file():
        return []
    summary = json.loads(summary_path.read_text())
    if summary.get("rounds_completed") or (summary.get("final") or {}).get("status") == "released":
        return []
    admission = summary.get("admission") or {}
    return sorted(s for s, e in admission.items() if "no answer" in str((e or {}).get("reason", "")))


def run_simulation(req: SimulationRequest, recipe=None) -> dict:
    """Run the job in FLARE's simulator; return the summary the server wrote. ``recipe``: an
    already-built one instead of the job folder's (benchmarks that are not user jobs)."""
    from nvflare.recipe.sim_env import SimEnv

    out = Path(req.out).resolve()
    if req.workspace:
        root = Path(req.workspace).resolve()  # reused on purpose: ledgers and keys carry over
    else:
        root = out / "workspace"
        shutil.rmtree(root, ignore_errors=True)  # a fresh federation for every run without --workspace
    out.mkdir(parents=True, exist_ok=True)
    prepare_participants(req, root)
    if recipe is None:
        module = load_job(req.job)
        rounds = req.rounds if req.rounds is not None else module.DEFAULTS.get("rounds", 1)
        epsilon = None if req.no_dp else (req.epsilon if req.epsilon is not None else module.DEFAULTS.get("epsilon"))
        recipe = module.make_recipe(
            sites=req.sites,
            rounds=rounds,
            encrypt=req.encrypt,
            epsilon=epsilon,
            min_cell=req.min_cell,
            # the analytics jobs check variable names against a `clinfed data split` folder before submitting
            **{"data_dir": req.data_dir, **req.extra},
        )
    flare_root = root / "flare"
    flare_ws = flare_root / recipe.name
    started = time.time()
    allow_clinfed_components(flare_ws)
    # One process per site, each with its own torch thread pool: more threads than cores only thrash.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // req.sites)))
    # Faults are a property of the simulated site processes, never of the job (see clinfed.fl.faults).
    overrides = {SIM_ROOT_ENV: str(root), INJECT_ENV: encode_faults(req.inject)}
    previous = {name: os.environ.get(name) for name in overrides}
    os.environ.update(overrides)
    try:
        # A DP-SGD imaging site holds ~1.2 GB (torch, Opacus' per-sample buffers, its images): 20 at once
        # overran this 23 GB machine, so past MAX_PARALLEL_SITES the simulator's site processes take turns.
        parallel = req.parallel or min(req.sites, MAX_PARALLEL_SITES)
        for attempt in (1, 2):
            env = SimEnv(clients=req.site_names, num_threads=parallel, workspace_root=str(flare_root))
            with stopping_children_on_exit():
                recipe.run(env)
            silent = _never_started(flare_ws / "server" / "simulate_job" / "summary.json")
            if not silent or attempt == 2:
                break
            # FLARE's simulator now and then starts a site process that never connects ("Connection reset
            # by peer"; measured in about 1 of 40 loaded CI runs): the job ends at the admission deadline
            # with nothing trained or released. Every simulated site is ours, so that is the simulator's
            # failure, not the site's answer: run it once more from a clean FLARE workspace.
            print(f"clinfed simulate: {', '.join(silent)} never started in FLARE's simulator; running it again")
            shutil.rmtree(flare_ws, ignore_errors=True)
            allow_clinfed_components(flare_ws)
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    produced = flare_ws / "server" / "simulate_job" / "summary.json"
    if not produced.exists():
        raise RuntimeError(f"the simulation wrote no summary (see logs under {flare_ws})")
    summary = json.loads(produced.read_text())
    if req.no_dp:
        summary["policy_override"] = {"require_dp": False, "by": "clinfed simulate --no-dp (simulator only)"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for png in sorted(root.glob(f"site-*/reports/{recipe.name}-*.png")):
        if png.stat().st_mtime >= started:  # a reused workspace keeps earlier runs' figures: not this run's
            shutil.copyfile(png, out / png.name)
    from clinfed.report import is_training, write_report

    if is_training(summary) and summary.get("rounds") and summary["rounds"][0]["sites"]:
        # a metric per round only means something for training; analytics jobs get their own figures
        from clinfed.plots import plot_rounds

        plot_rounds(summary, out / "rounds.png", summary.get("final", {}).get("primary_metric", "auc"))
    write_report(summary, out)
    return summary
