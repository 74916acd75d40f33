"""`nvflare poc` for the bundled jobs: FLARE's proof-of-concept mode with clinfed's kits.

A thin wrapper. `prepare` hands FLARE a project file derived from `provisioning/localhost.yml`
(`nvflare poc prepare -i`), so clinfed's builder places the sites' local policy and signs the kits
exactly as in a provisioned deployment, and no kit holds a CKKS key; `start` / `stop` are
`nvflare poc start` / `stop` with this Python first on PATH (the kits' scripts run `python3`, and
jobs carry no code, so it must be the one with clinfed). After starting, `start` runs the
key_exchange job as the POC project admin when a site or the server lacks its context, as
`clinfed up` does: a site generates the key pair, the others receive it sealed to their kit
certificates, the server the public context (`clinfed.keys`). Jobs are then submitted with
`clinfed submit JOB --kit <admin kit>` like in any deployment.

FLARE keeps the POC workspace location in NVFLARE_POC_WORKSPACE (set here from `workspace`) and
registers the POC admin kits in ~/.nvflare, as `nvflare poc` always does.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from clinfed.deploy.builder import admit_clinfed
from clinfed.deploy.federation import DeployError, own_server_storage, participant_env
from clinfed.deploy.provision import load_project

DEFAULT_PROJECT = Path(__file__).resolve().parents[3] / "provisioning" / "localhost.yml"


def _nvflare(args: list[str], workspace: Path, timeout: float = 300.0) -> str:
    env = {**participant_env(), "NVFLARE_POC_WORKSPACE": str(Path(workspace).resolve())}
    cmd = [str(Path(sys.executable).parent / "nvflare"), "poc", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        raise DeployError(f"nvflare poc {args[0]} failed: {lines[-1] if lines else f'exit {proc.returncode}'}")
    return proc.stdout


def poc_project(sites: int, project: Path = DEFAULT_PROJECT) -> dict:
    """`project` with its sites replaced by site-1 … site-N (the bundled data splits go by that number)."""
    if sites < 1:
        raise ValueError(f"sites must be a positive number, got {sites}")
    data = load_project(project)
    others = [p for p in data["participants"] if p.get("type") != "client"]
    clients = [{"name": f"site-{i}", "type": "client", "org": f"hospital_{i}"} for i in range(1, sites + 1)]
    data["participants"] = others[:1] + clients + others[1:]
    return data


def kits_dir(workspace: Path, project: Path = DEFAULT_PROJECT) -> Path:
    """Where `nvflare poc prepare` put the kits (server, sites, admins)."""
    return Path(workspace).resolve() / load_project(project)["name"] / "prod_00"


def prepare(workspace: Path, sites: int = 3, project: Path = DEFAULT_PROJECT) -> Path:
    """`nvflare poc prepare -i` with clinfed's project; returns the kits folder."""
    workspace = Path(workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="clinfed-poc-") as tmp:  # FLARE copies it to <workspace>/project.yml
        project_file = Path(tmp) / "project.yml"
        project_file.write_text(yaml.safe_dump(poc_project(sites, project), sort_keys=False))
        _nvflare(["prepare", "-i", str(project_file), "--force"], workspace)
    kits = kits_dir(workspace, project)
    server = next(p for p in kits.iterdir() if (p / "startup" / "fed_server.json").is_file())
    admit_clinfed(server / "local")  # `nvflare poc prepare` rewrites the server's resources.json from its .default
    own_server_storage(server)
    return kits


def start(workspace: Path, timeout: int = 120, project: Path = DEFAULT_PROJECT) -> str:
    """`nvflare poc start` (server and sites; waits until they are ready), then the key exchange if needed."""
    from clinfed.deploy.federation import ensure_keys, wait_connected

    if not Path(workspace).is_dir():
        raise ValueError(f"POC workspace not found: {workspace} (run clinfed poc prepare first)")
    # FLARE's own readiness wait (`poc start` without --no-wait) was seen to hang past its --timeout on a
    # loaded 2-core machine; we start the processes and wait for the sites through the admin API, as `up` does.
    output = _nvflare(["start", "--no-wait"], workspace, timeout=timeout)
    kits = kits_dir(workspace, project)
    wait_connected(kits, timeout=timeout)
    summary = ensure_keys(kits, timeout=max(timeout, 180))
    if summary is not None:
        output += f"\nCKKS key {summary['fingerprint']} made at {summary['holder']}, sent to the other sites sealed\n"
    return output


def stop(workspace: Path) -> str:
    """`nvflare poc stop`."""
    if not Path(workspace).is_dir():
        raise ValueError(f"POC workspace not found: {workspace}")
    return _nvflare(["stop"], workspace)
