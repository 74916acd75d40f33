"""Run a provisioned federation on this host: the server and every site as real FLARE processes.

`up(kits_dir)` starts each kit the way its owner would, with the kit's own `startup/sub_start.sh`
(FLARE's `server_train` / `client_train`, mTLS with the kit's certificates, signed startup
content), in the kit folder as its workspace, and waits until the server listens and every site
has registered. It is the operator's localhost rehearsal of a real deployment, so it refuses kits
whose server address is not this machine's loopback: nothing it starts may talk to another host.

`down(kits_dir)` stops exactly what `up` started. FLARE starts each job in new processes of their
own session (`setsid`), so stopping a process group is not enough: the process tree (and any job
process left orphaned with one of these kits as its workspace) is collected before anything is
signalled, and `down` checks that none of it survives.

Kits carry no CKKS key (the operator who provisions must never hold one): once every site is
connected, `up` has the hospitals make and share it (the key_exchange job, `clinfed.keys.exchange`)
whenever a site or the server lacks its context, as the operator of a real federation would with
`clinfed submit key_exchange` (docs/keys.md).

What `up` started is recorded in `<kits_dir>/federation.pids.json` (pid and start time, so a
recycled pid is never mistaken for ours). `up` is idempotent: it starts only participants not
already running, which is how a site issued by `clinfed provision --add-site` joins a running
federation.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

PID_FILE = "federation.pids.json"
CONSOLE_LOG = "console.txt"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "ip6-localhost"}
FLARE_TMP_STORAGE = "/tmp/nvflare/"


class DeployError(RuntimeError):
    """A deployment step failed at run time (one line, names the participant and where to look)."""


@dataclass(frozen=True)
class Kit:
    name: str
    path: Path
    role: str  # "server", "client" or "admin"


def find_kits(kits_dir: Path) -> list[Kit]:
    """The startup kits directly under `kits_dir`, recognised by FLARE's startup config file."""
    kits_dir = Path(kits_dir)
    if not kits_dir.is_dir():
        raise ValueError(f"kits folder not found: {kits_dir}")
    roles = {"fed_server.json": "server", "fed_client.json": "client", "fed_admin.json": "admin"}
    kits = []
    for path in sorted(p for p in kits_dir.iterdir() if p.is_dir()):
        for filename, role in roles.items():
            if (path / "startup" / filename).is_file():
                kits.append(Kit(path.name, path.resolve(), role))
                break
    return kits


def resolve_kits_dir(path: Path) -> Path:
    """`path` itself when it holds kits, else the newest `prod_NN` of the one project provisioned into it.

    So `clinfed up --kits OUT` works with the folder given to `clinfed provision --out OUT`.
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"kits folder not found: {path}")
    if find_kits(path):
        return path.resolve()
    prods = sorted(path.glob("*/prod_[0-9][0-9]"))
    projects = {p.parent for p in prods}
    if len(projects) > 1:
        names = ", ".join(sorted(p.name for p in projects))
        raise ValueError(f"{path} holds several federations ({names}); pass one's prod_NN folder")
    if not prods:
        raise ValueError(f"{path}: no startup kits here (provision first: clinfed provision --out {path})")
    return prods[-1].resolve()


def service_address(kit: Kit) -> tuple[str, int]:
    config = json.loads((kit.path / "startup" / f"fed_{kit.role}.json").read_text())
    target = config["servers"][0]["service"]["target"]
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(
        info[4][0].startswith("127.") or info[4][0] in ("::1", "::ffff:127.0.0.1") for info in infos
    )


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _admin_port(server: Kit) -> int:
    config = json.loads((server.path / "startup" / "fed_server.json").read_text())
    return int(config["servers"][0].get("admin_port") or service_address(server)[1])


def own_server_storage(server_dir: Path) -> bool:
    """Give the server a job store and snapshot folder inside its own kit.

    FLARE's default server resources put every server on a host in /tmp/nvflare/, so two federations
    on one machine (a test run next to a POC, two provisioned projects) would share one job store and
    a restarted server would pick up the other's jobs. Storage roots must be absolute in FLARE, so
    this happens where the kit runs, not at provisioning. Returns True when the file was changed.
    """
    local = Path(server_dir) / "local"
    path = local / "resources.json"
    source = path if path.exists() else local / "resources.json.default"
    resources = json.loads(source.read_text())
    changed = False
    storage = Path(server_dir).resolve() / "storage"
    for comp in resources.get("components", []):
        args = comp.get("args") or {}
        if comp.get("id") == "job_manager" and str(args.get("uri_root", "")).startswith(FLARE_TMP_STORAGE):
            args["uri_root"] = str(storage / "jobs")
            changed = True
    snapshot = (((resources.get("snapshot_persistor") or {}).get("args") or {}).get("storage") or {}).get("args") or {}
    if str(snapshot.get("root_dir", "")).startswith(FLARE_TMP_STORAGE):
        snapshot["root_dir"] = str(storage / "snapshot")
        changed = True
    if changed or source != path:
        path.write_text(json.dumps(resources, indent=2) + "\n")
    return changed


# --- the PID record --------------------------------------------------------------------------------
def _read_pids(kits_dir: Path) -> dict[str, dict]:
    path = Path(kits_dir) / PID_FILE
    return json.loads(path.read_text()).get("participants", {}) if path.exists() else {}


def _write_pids(kits_dir: Path, participants: dict[str, dict]) -> None:
    path = Path(kits_dir) / PID_FILE
    if participants:
        path.write_text(json.dumps({"participants": participants}, indent=2) + "\n")
    elif path.exists():
        path.unlink()


def _process(record: dict) -> psutil.Process | None:
    """The recorded process if it is still the one we started (same pid *and* start time)."""
    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["create_time"])) > 0.01 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, ValueError):
        return None


def running(kits_dir: Path) -> dict[str, int]:
    """Participant → pid for what `up` started here and is still alive."""
    return {name: proc.pid for name, rec in _read_pids(kits_dir).items() if (proc := _process(rec)) is not None}


# --- start -----------------------------------------------------------------------------------------
def participant_env() -> dict[str, str]:
    """The kits' scripts call `python3`: make it this interpreter, where clinfed is installed (jobs carry no code)."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("CLINFED_SIM_ROOT", None)  # a deployed participant keeps its state in its own kit
    env.pop("NVFL_WORKSPACE", None)
    return env


def _start(kit: Kit) -> dict:
    console = open(kit.path / CONSOLE_LOG, "ab")  # noqa: SIM115 (handed to the child, closed below)
    try:
        proc = subprocess.Popen(
            ["bash", str(kit.path / "startup" / "sub_start.sh"), "--once"],  # --once: exec FLARE, no respawn loop
            cwd=kit.path,
            env=participant_env(),
            stdin=subprocess.DEVNULL,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the federation outlives the command that started it
        )
    finally:
        console.close()
    return {
        "pid": proc.pid,
        "create_time": psutil.Process(proc.pid).create_time(),
        "role": kit.role,
        "kit": str(kit.path),
    }


def _tail(kit: Kit, lines: int = 1) -> str:
    for name in ("log.txt", CONSOLE_LOG):
        path = kit.path / name
        if path.exists():
            text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
            if text:
                return " | ".join(text[-lines:])
    return "no log"


def _wait(condition, timeout: float, what: str, watch: dict[str, tuple[Kit, dict]]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, (kit, record) in watch.items():
            if _process(record) is None:
                raise DeployError(f"{name}: exited while {what} ({kit.path / 'log.txt'}: {_tail(kit)})")
        if condition():
            return
        time.sleep(0.5)
    raise DeployError(f"timed out after {timeout:.0f}s {what}")


def _wait_connected(admin: Kit, sites: list[Kit], timeout: float, watch: dict[str, tuple[Kit, dict]]) -> None:
    """Ask the server, through FLARE's admin API, until every site in `sites` is connected."""
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    username = json.loads((admin.path / "startup" / "fed_admin.json").read_text())["admin"]["username"]
    expected = {k.name for k in sites}
    deadline = time.monotonic() + timeout
    session = new_secure_session(username, str(admin.path), timeout=timeout)
    try:
        names: set[str] = set()

        def all_connected() -> bool:
            names.clear()
            names.update(c.name for c in session.get_system_info().client_info)
            return expected <= names

        _wait(
            all_connected,
            max(1.0, deadline - time.monotonic()),
            "waiting for the sites to connect",
            watch,
        )
    except DeployError as exc:
        if "timed out" not in str(exc):
            raise
        missing = sorted(expected - names)
        kit = next(k for k in sites if k.name == missing[0]) if missing else sites[0]
        raise DeployError(
            f"{', '.join(missing)}: not connected after {timeout:.0f}s ({kit.path / 'log.txt'}: {_tail(kit)})"
        ) from None
    finally:
        session.close()


def up(kits_dir: Path, timeout: float = 180.0, exchange_keys: bool = True) -> dict[str, int]:
    """Start the server, then every site, from the kits in `kits_dir`; returns participant → pid.

    Waits until the server listens and (through an admin kit found in `kits_dir`) until every site is
    connected. Participants already running from an earlier `up` are left as they are. Then, with
    `exchange_keys`, if a site lacks the federation's CKKS key or the server its public context (new
    kits carry none; a site added with `clinfed provision --add-site` neither), it runs the
    key_exchange job as the project admin: sites that hold the key keep it, the others receive it
    from a hospital encrypted to their kit certificates (`clinfed.keys`).
    """
    kits_dir = Path(kits_dir).resolve()
    kits = find_kits(kits_dir)
    servers = [k for k in kits if k.role == "server"]
    sites = [k for k in kits if k.role == "client"]
    admins = [k for k in kits if k.role == "admin"]
    if len(servers) != 1:
        raise ValueError(f"{kits_dir}: expected one server kit, found {len(servers)}")
    if not sites:
        raise ValueError(f"{kits_dir}: no site kits")
    server = servers[0]
    for kit in [server, *sites]:
        host, _ = service_address(kit)
        if not is_loopback(host):
            raise ValueError(
                f"{kit.name}: server address '{host}' is not this host's loopback; clinfed up runs local kits only"
            )

    records = {name: rec for name, rec in _read_pids(kits_dir).items() if _process(rec) is not None}
    started: dict[str, tuple[Kit, dict]] = {}
    try:
        _, fl_port = service_address(server)
        if server.name not in records:
            if _port_open(fl_port):
                raise DeployError(
                    f"{server.name}: port {fl_port} on 127.0.0.1 is already in use (another FLARE server?)"
                )
            own_server_storage(server.path)
            started[server.name] = (server, _start(server))
            records[server.name] = started[server.name][1]
            _write_pids(kits_dir, records)
        admin_port = _admin_port(server)
        _wait(
            lambda: _port_open(fl_port) and _port_open(admin_port),
            timeout,
            f"waiting for {server.name} to listen on 127.0.0.1:{fl_port}",
            started,
        )
        for kit in sites:
            if kit.name not in records:
                started[kit.name] = (kit, _start(kit))
                records[kit.name] = started[kit.name][1]
        _write_pids(kits_dir, records)
        if admins:  # any admin may "view"; prefer the project admin's kit
            _wait_connected(project_admin(admins), sites, timeout, started)
    except BaseException:
        _stop_records(kits_dir, {name: rec for name, (_, rec) in started.items()})
        for name in started:
            records.pop(name, None)
        _write_pids(kits_dir, records)
        raise
    if exchange_keys and admins and missing_keys(server, sites):
        # The federation stays up if this fails: the message names the site and why.
        run_key_exchange(project_admin(admins), len(sites), timeout)
    return {name: int(rec["pid"]) for name, rec in records.items()}


# --- the CKKS key ----------------------------------------------------------------------------------
def project_admin(admins: list[Kit]) -> Kit:
    """The admin kit whose certificate carries the project_admin role (FLARE writes the role there)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    for admin in admins:
        cert = x509.load_pem_x509_certificate((admin.path / "startup" / "client.crt").read_bytes())
        roles = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.UNSTRUCTURED_NAME)]
        if "project_admin" in roles:
            return admin
    return next((a for a in admins if a.name.startswith("admin")), admins[0])


def missing_keys(server: Kit, sites: list[Kit]) -> list[str]:
    """Participants without their CKKS context: sites without the secret one, a server without the public one.

    Only whether the files exist: `clinfed up` runs every kit on this host, but the key itself is
    made and checked by the sites (`clinfed.keys`), never read here. A site's key counts only in
    its `local/` (made at a hospital); one in `startup/` came with the kit, from the operator, and
    the key exchange refuses it by name.
    """
    from clinfed.fl.participant import SERVER_CONTEXT_FILE, SITE_CONTEXT_FILE, find_context_file

    missing = [k.name for k in sites if not (k.path / "local" / SITE_CONTEXT_FILE).exists()]
    if find_context_file(server.path, SERVER_CONTEXT_FILE) is None:
        missing.append(server.name)
    return missing


def run_key_exchange(admin: Kit, sites: int, timeout: float = 300.0) -> dict:
    """Submit the key_exchange job as `admin` and wait for it; returns its summary (DeployError if it failed).

    A hospital generates the key pair (or the one that holds it already hands it on) and every other
    site receives it encrypted to its kit certificate; the server keeps only the public context.
    """
    import tempfile

    from clinfed.deploy.submit import submit

    with tempfile.TemporaryDirectory(prefix="clinfed-keys-") as tmp:
        result = submit("key_exchange", admin.path, wait=True, out=Path(tmp), sites=sites, timeout=timeout)
    summary = result.summary or {}
    if not result.completed or summary.get("status") != "ok":
        reason = summary.get("reason") or f"no summary (job {result.job_id} ended {result.status})"
        raise DeployError(f"key exchange failed (the federation is up; job {result.job_id}): {reason}")
    return summary


def wait_connected(kits_dir: Path, timeout: float = 180.0) -> None:
    """Wait, through the project admin's FLARE API session, until every site kit in `kits_dir` is connected."""
    kits = find_kits(Path(kits_dir))
    sites = [k for k in kits if k.role == "client"]
    admins = [k for k in kits if k.role == "admin"]
    if not sites or not admins:
        raise ValueError(f"{kits_dir}: needs site and admin kits")
    _wait_connected(project_admin(admins), sites, timeout, {})


def ensure_keys(kits_dir: Path, timeout: float = 300.0) -> dict | None:
    """Run the key exchange for the kits in `kits_dir` if a site or the server lacks its context.

    For a federation started by other means than `up` (FLARE's POC mode). Returns the exchange's
    summary, or None when every participant already held its context.
    """
    kits = find_kits(Path(kits_dir))
    server = next((k for k in kits if k.role == "server"), None)
    sites = [k for k in kits if k.role == "client"]
    admins = [k for k in kits if k.role == "admin"]
    if server is None or not sites or not admins:
        raise ValueError(f"{kits_dir}: needs a server, site and admin kits for the key exchange")
    if not missing_keys(server, sites):
        return None
    return run_key_exchange(project_admin(admins), len(sites), timeout)


# --- stop ------------------------------------------------------------------------------------------
def _tree(records: dict[str, dict]) -> list[psutil.Process]:
    """Every process to stop: the recorded ones, their descendants, and job processes orphaned from them."""
    procs: dict[int, psutil.Process] = {}
    kit_paths = [rec["kit"] for rec in records.values()]
    for rec in records.values():
        proc = _process(rec)
        if proc is None:
            continue
        procs[proc.pid] = proc
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.update({child.pid: child for child in proc.children(recursive=True)})
    uid = os.getuid()
    for proc in psutil.process_iter(["pid", "uids", "cmdline"]):
        try:
            if proc.pid in procs or proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            cmdline = proc.info["cmdline"] or []
            if "nvflare" in " ".join(cmdline) and any(path in cmdline for path in kit_paths):
                procs[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    procs.pop(os.getpid(), None)
    return list(procs.values())


def _stop_records(kits_dir: Path, records: dict[str, dict], grace: float = 15.0) -> list[int]:
    procs = _tree(records)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    _, alive = psutil.wait_procs(alive, timeout=5.0)
    if alive:
        raise DeployError(f"{kits_dir}: processes still running after SIGKILL: {sorted(p.pid for p in alive)}")
    return sorted(p.pid for p in procs)


def down(kits_dir: Path) -> list[int]:
    """Stop what `up` started from `kits_dir` (and the job processes under it); returns the pids stopped.

    Sites go first, so none of them is left retrying a server that is already gone.
    """
    kits_dir = Path(kits_dir).resolve()
    if not kits_dir.is_dir():
        raise ValueError(f"kits folder not found: {kits_dir}")
    records = _read_pids(kits_dir)
    sites = {name: rec for name, rec in records.items() if rec.get("role") != "server"}
    servers = {name: rec for name, rec in records.items() if rec.get("role") == "server"}
    stopped = _stop_records(kits_dir, sites) + _stop_records(kits_dir, servers)
    _write_pids(kits_dir, {})
    return stopped
