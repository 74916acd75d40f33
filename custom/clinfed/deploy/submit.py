"""Submit a job to a running federation as one of its admins, through FLARE's API, and fetch the result.

What a researcher does at the admin console (`fl_admin.sh`, `submit_job`, `download_job`), as a
function: the job is exported from its recipe (`clinfed.jobs`) into a plain FLARE job folder, or
taken as is when `job` is already such a folder, and submitted with
`nvflare.fuel.flare_api.flare_api.new_secure_session` using the admin's startup kit, so the server
authenticates and authorises the *person* (mTLS certificate, role in the site and server
`authorization.json`), and FLARE signs the job with that admin's key. A refused submission raises
`SubmitRefused` with the server's reason on one line.

With `wait`, it follows the job to its end, downloads the server's job workspace into
`out/<job id>/` and copies the summary.json that `clinfed.fl.controller.SecureFedAvg` wrote there
to `out/summary.json`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clinfed.deploy.federation import DeployError
from clinfed.textio import one_line

SUMMARY_FILE = "summary.json"
COMPLETED = "FINISHED:COMPLETED"


class SubmitRefused(DeployError):
    """The server would not take the job from this admin (authorisation, or an invalid job)."""


@dataclass
class SubmitResult:
    job_id: str
    status: str  # FLARE's job status: "SUBMITTED" when not waiting, else e.g. "FINISHED:COMPLETED"
    result_dir: Path | None = None
    summary: dict | None = None

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


def admin_username(admin_kit: Path) -> str:
    config = Path(admin_kit) / "startup" / "fed_admin.json"
    if not config.is_file():
        raise ValueError(f"{admin_kit}: not an admin startup kit (no startup/fed_admin.json)")
    return json.loads(config.read_text())["admin"]["username"]


def _export(job: str, folder: Path, sites: int, rounds: int | None, encrypt: bool, epsilon: float | None) -> Path:
    from clinfed.jobs import load_job

    module = load_job(job)
    rounds = rounds or module.DEFAULTS.get("rounds", 1)
    epsilon = epsilon if epsilon is not None else module.DEFAULTS.get("epsilon")
    recipe = module.make_recipe(sites=sites, rounds=rounds, encrypt=encrypt, epsilon=epsilon)
    recipe.export(str(folder))
    return folder / recipe.name


def _session(admin_kit: Path, timeout: float = 10.0):
    from nvflare.fuel.flare_api.api_spec import AuthenticationError, NoConnection
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    username = admin_username(admin_kit)
    admin = json.loads((Path(admin_kit) / "startup" / "fed_admin.json").read_text())["admin"]
    try:
        return new_secure_session(username, str(Path(admin_kit).resolve()), timeout=timeout)
    except NoConnection:
        where = f"{admin.get('host')}:{admin.get('port')}"
        raise DeployError(f"{username}: cannot reach the server at {where} (is the federation up?)") from None
    except AuthenticationError as exc:
        raise SubmitRefused(f"{username}: the server does not accept this kit ({one_line(exc)})") from None


def submit(
    job: str | Path,
    admin_kit: Path,
    wait: bool = False,
    out: Path | None = None,
    *,
    sites: int | None = None,
    rounds: int | None = None,
    encrypt: bool = True,
    epsilon: float | None = None,
    timeout: float = 3600.0,
) -> SubmitResult:
    """Submit `job` (a bundled job name or an exported job folder) as the admin whose kit is `admin_kit`.

    `sites` defaults to the number of sites connected now (the job's min_clients, and which part of
    the bundled demo data each site takes); `rounds`, `encrypt`, `epsilon` as for `clinfed export`.
    With `wait`, blocks until the job ends (at most `timeout` seconds) and, when `out` is given,
    downloads the result there.
    """
    from nvflare.fuel.flare_api.api_spec import AuthorizationError, InvalidJobDefinition, JobTimeout

    admin_kit = Path(admin_kit)
    username = admin_username(admin_kit)
    folder = Path(job)
    prebuilt = folder.is_dir() and (folder / "meta.json").is_file()
    if not prebuilt:
        from clinfed.jobs import load_job

        load_job(str(job))  # an unknown job is bad input: say so before connecting
        if sites is not None and sites < 1:
            raise ValueError(f"sites must be a positive number, got {sites}")
    session = _session(admin_kit)
    try:
        with tempfile.TemporaryDirectory(prefix="clinfed-job-") as tmp:
            if not prebuilt:
                n = sites or len(session.get_system_info().client_info)
                if n < 1:
                    raise DeployError("no site is connected to the server; start the sites first (clinfed up)")
                folder = _export(str(job), Path(tmp), n, rounds, encrypt, epsilon)
            try:
                job_id = session.submit_job(str(folder.resolve()))
            except AuthorizationError as exc:
                raise SubmitRefused(f"{username} may not submit jobs here: {_reason(exc)}") from None
            except InvalidJobDefinition as exc:
                raise SubmitRefused(f"the server refused job '{folder.name}': {one_line(exc)}") from None
        if not wait:
            return SubmitResult(job_id, "SUBMITTED")
        try:
            meta = session.wait_for_job(job_id, timeout=timeout, poll_interval=2.0)
        except JobTimeout:
            return SubmitResult(job_id, "RUNNING")
        result = SubmitResult(job_id, str(meta.get("status", "UNKNOWN")))
        if out is not None:
            result.result_dir, result.summary = _download(session, job_id, Path(out))
        return result
    finally:
        session.close()


def _download(session, job_id: str, out: Path) -> tuple[Path, dict | None]:
    out.mkdir(parents=True, exist_ok=True)
    target = out / job_id
    if target.exists():
        shutil.rmtree(target)
    location = Path(session.download_job_result(job_id, str(out.resolve())))
    produced = location / "workspace" / SUMMARY_FILE
    if not produced.is_file():
        return location, None
    shutil.copyfile(produced, out / SUMMARY_FILE)
    summary = json.loads(produced.read_text())
    from clinfed.report import write_report

    write_report(summary, out)  # report.html next to summary.json, as the simulator writes it
    return location, summary


def _reason(exc: Exception) -> str:
    """FLARE's message, e.g. "user 'x' is not authorized for 'submit_job'", without the command echo."""
    text = one_line(exc)
    marker = text.rfind(": user ")
    return text[marker + 2 :].rstrip("'") + "'" if marker >= 0 else text
