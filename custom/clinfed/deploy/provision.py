"""Signed startup kits for a consortium, with FLARE's provisioner and clinfed's site policy in them.

`provision` is FLARE's own provisioning (`nvflare provision -p project.yml`, through its API:
`prepare_project` / `prepare_builders` / `Provisioner`) on a project file from `provisioning/`;
the project's `clinfed.deploy.builder.ClinfedKitBuilder` puts `workspace_templates/` into every
site's `local/` before FLARE signs the kits. The kits land where FLARE puts them,
`<out>/<project name>/prod_00/<participant>/`; that folder is what `clinfed up --kits` takes and
what the operator hands out, one participant folder each.

No kit holds a CKKS key. A project with FLARE's HEBuilder is refused: it generates the federation's
secret key here, at the operator, who keeps every kit until they are handed out. The hospitals make
and share the key themselves once their kits run (`clinfed.keys`, the key_exchange job that
`clinfed up` submits; docs/keys.md).

`add_site` is FLARE's dynamic provisioning (`nvflare provision --add_client`): same project, same
provisioning state (root CA and issued certificates in `<out>/<project>/state/`), one more client.
FLARE re-issues the whole federation into a new `prod_NN`; the new site's kit is moved next to the
kits already handed out, and the new `prod_NN` (copies of kits that were already issued, same
certificates) is removed after checking that no existing certificate changed. The new site gets the
federation's key from a hospital, through the federation, the next time the key exchange runs.
"""

from __future__ import annotations

import copy
import re
import shutil
import tempfile
from pathlib import Path

import yaml

BUILDER_PATH = "clinfed.deploy.builder.ClinfedKitBuilder"
HE_BUILDER_PATH = "nvflare.lighter.impl.he.HEBuilder"
SIGNATURE_BUILDER_PATH = "nvflare.lighter.impl.signature.SignatureBuilder"


class _Log:
    """FLARE's provisioner prints by default; keep its messages and show only the errors."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def debug(self, msg: str) -> None:
        pass

    def info(self, msg: str) -> None:
        pass

    def warning(self, msg: str) -> None:
        pass

    def error(self, msg: str) -> None:
        self.errors.append(msg)


def load_project(project: Path) -> dict:
    """The project file as FLARE reads it, checked for what clinfed needs (ValueError names the problem)."""
    project = Path(project)
    if not project.is_file():
        raise ValueError(f"project file not found: {project}")
    try:
        data = yaml.safe_load(project.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{project}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data.get("name") or not isinstance(data.get("participants"), list):
        raise ValueError(f"{project}: not a FLARE project file (needs name, participants and builders)")
    paths = [b.get("path") for b in data.get("builders") or [] if isinstance(b, dict)]
    if BUILDER_PATH not in paths:
        raise ValueError(f"{project}: builders must include {BUILDER_PATH} (before SignatureBuilder)")
    if SIGNATURE_BUILDER_PATH in paths and paths.index(BUILDER_PATH) > paths.index(SIGNATURE_BUILDER_PATH):
        raise ValueError(f"{project}: {BUILDER_PATH} must come before SignatureBuilder, or the kits' signatures break")
    if HE_BUILDER_PATH in paths:
        raise ValueError(
            f"{project}: remove {HE_BUILDER_PATH}: it would generate every hospital's CKKS secret key "
            "at the operator (the hospitals exchange the key themselves, see docs/keys.md)"
        )
    return data


def project_dir(project_dict: dict, out: Path) -> Path:
    return Path(out) / project_dict["name"]


def kits_dir(project_dict: dict, out: Path) -> Path | None:
    """The federation's issued kits (`<out>/<project>/prod_NN`, the newest), or None before provisioning."""
    prods = sorted(project_dir(project_dict, out).glob("prod_[0-9][0-9]"))
    return prods[-1] if prods else None


def _run_flare(project_dict: dict, out: Path, add_client: dict | None = None) -> Path:
    from nvflare.lighter.constants import CtxKey
    from nvflare.lighter.prov_utils import prepare_builders, prepare_packager
    from nvflare.lighter.provision import prepare_project
    from nvflare.lighter.provisioner import Provisioner

    project_dict = copy.deepcopy(project_dict)
    project_dict.setdefault("gen_scripts", False)
    with tempfile.TemporaryDirectory() as tmp:
        add_client_file = None
        if add_client is not None:  # exactly what `nvflare provision --add_client FILE` reads
            add_client_file = str(Path(tmp) / "add_client.yml")
            Path(add_client_file).write_text(yaml.safe_dump(add_client))
        try:
            project = prepare_project(project_dict, add_client_file_path=add_client_file)
            builders = prepare_builders(project_dict)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"project {project_dict['name']}: {str(exc).splitlines()[0]}") from None
        log = _Log()
        Path(out).mkdir(parents=True, exist_ok=True)
        ctx = Provisioner(str(Path(out).resolve()), builders, prepare_packager(project_dict)).provision(
            project, logger=log
        )
    if ctx.get(CtxKey.BUILD_ERROR) or not ctx.get(CtxKey.CURRENT_PROD_DIR):
        detail = "; ".join(log.errors) or "see the messages above"
        raise RuntimeError(f"FLARE provisioning of {project_dict['name']} failed: {detail}")
    return Path(ctx[CtxKey.CURRENT_PROD_DIR])


def provision(project: Path, out: Path) -> Path:
    """Issue every participant's signed kit; returns the folder holding them (`<out>/<name>/prod_00`).

    Refuses an `out` that already holds this federation: provisioning again would issue new kits
    (a new root CA) while the old ones may be running; `add_site` grows a federation instead.
    """
    project_dict = load_project(project)
    existing = kits_dir(project_dict, out)
    if existing is not None:
        raise ValueError(
            f"{out} already holds kits for '{project_dict['name']}' ({existing}); "
            "add a site with --add-site or provision into a new folder"
        )
    return _run_flare(project_dict, out)


def add_site(name: str, project: Path, out: Path, org: str | None = None) -> Path:
    """Issue a signed kit for one more site of a provisioned federation; returns the new kit's folder.

    Existing kits are not re-issued: the new kit goes next to them in the federation's kits folder,
    with a certificate from the same root CA and no CKKS key (it receives the federation's key from
    a hospital through the key exchange, `clinfed up` runs it). `org` defaults
    to the site's name with FLARE's org alphabet (`site-4` → `site_4`): each hospital its own organisation.
    """
    from nvflare.apis.utils.format_check import name_check

    project_dict = load_project(project)
    kits = kits_dir(project_dict, out)
    if kits is None:
        raise ValueError(f"{out} holds no kits for '{project_dict['name']}'; run clinfed provision first")
    bad, reason = name_check(name, "client")
    if bad:
        raise ValueError(f"invalid site name '{name}': {reason}")
    taken = {p.get("name") for p in project_dict["participants"]} | {p.name for p in kits.iterdir()}
    if name in taken:
        raise ValueError(f"'{name}' already has a kit in {kits}")

    new_prod = _run_flare(project_dict, out, add_client={"name": name, "org": org or re.sub(r"\W", "_", name)})
    try:
        _check_nothing_reissued(kits, new_prod)
        target = kits / name
        shutil.move(str(new_prod / name), str(target))
    finally:
        shutil.rmtree(new_prod, ignore_errors=True)
    return target


def _check_nothing_reissued(kits: Path, new_prod: Path) -> None:
    """FLARE's CertBuilder reuses its state, so every existing kit's certificate must come back unchanged."""
    for kit in sorted(p for p in kits.iterdir() if (p / "startup").is_dir()):
        for cert in sorted((kit / "startup").glob("*.crt")):
            again = new_prod / kit.name / "startup" / cert.name
            if not again.is_file() or again.read_bytes() != cert.read_bytes():
                raise RuntimeError(
                    f"provisioning state in {kits.parent / 'state'} no longer matches kit {kit.name}; "
                    "refusing to issue a kit from a different CA"
                )
