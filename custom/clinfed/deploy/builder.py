"""A FLARE provisioning Builder that makes FLARE's startup kits clinfed kits.

FLARE's builders issue certificates (CertBuilder) and the kit files (StaticFileBuilder), and
SignatureBuilder signs them. Three things a clinfed federation needs are not theirs to know:

- each hospital's local policy (``workspace_templates/``: resources.json with the "clinfed" section
  and the class allow-list, privacy.json, authorization.json) in its kit's ``local/``;
- a server whose class allow-list admits ``clinfed.`` (jobs carry no code, so the server builds
  ``clinfed.fl.controller.SecureFedAvg`` from the installed package and its default allow-list,
  FLARE's own classes only, would refuse it);
- signed kits *without* HEBuilder. clinfed's projects leave HEBuilder out on purpose: it generates
  the CKKS secret key at the operator, who would then hold every hospital's key (the hospitals make
  and share the key themselves, :mod:`clinfed.keys`). FLARE's SignatureBuilder signs only HE and
  confidential-computing kits, so this builder signs the others (startup/ and local/ as shipped,
  and the admins' startup/) with the root CA, and FLARE then refuses a tampered kit.

It runs before SignatureBuilder, so the signatures cover what the kit ships with.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from nvflare.lighter.constants import ProvFileName
from nvflare.lighter.spec import Builder, Project, ProvisionContext

ALLOW_LIST_PREFIX = "clinfed."
CLASS_ALLOW_LIST = "class_allow_list"
SITE_FILES = ("resources.json", "privacy.json", "authorization.json")
SERVER_FILES = ("authorization.json",)


def default_templates_dir() -> Path:
    """The bundle's ``workspace_templates/`` (or CLINFED_TEMPLATES_DIR for an installed bundle)."""
    env = os.environ.get("CLINFED_TEMPLATES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "workspace_templates"


def admit_clinfed(local_dir: Path) -> Path:
    """Add `clinfed.` to the class allow-list of `local_dir/resources.json` (made from FLARE's .default if absent).

    Without an explicit list FLARE applies its default one, so that list plus `clinfed.` is written.
    """
    from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

    path = Path(local_dir) / "resources.json"
    source = path if path.exists() else Path(local_dir) / ProvFileName.RESOURCES_JSON_DEFAULT
    resources = json.loads(source.read_text())
    allow = list(resources.get(CLASS_ALLOW_LIST) or DEFAULT_CLASS_ALLOW_LIST)
    if ALLOW_LIST_PREFIX not in allow:
        allow.append(ALLOW_LIST_PREFIX)
    resources[CLASS_ALLOW_LIST] = allow
    path.write_text(json.dumps(resources, indent=2) + "\n")
    return path


class ClinfedKitBuilder(Builder):
    def __init__(self, templates: str | None = None):
        """
        Args:
            templates: folder with the site-local files (default: the bundle's workspace_templates/).
        """
        self.templates = Path(templates) if templates else default_templates_dir()

    def initialize(self, project: Project, ctx: ProvisionContext):
        missing = [name for name in SITE_FILES if not (self.templates / name).is_file()]
        if missing:
            raise ValueError(f"{self.templates}: missing site template(s) {', '.join(missing)}")

    def build(self, project: Project, ctx: ProvisionContext):
        server = project.get_server()
        if server is not None:
            self._build_server(ctx.get_local_dir(server))
        for client in project.get_clients():
            local = Path(ctx.get_local_dir(client))
            for name in SITE_FILES:
                shutil.copyfile(self.templates / name, local / name)

    def finalize(self, project: Project, ctx: ProvisionContext):
        """Sign every kit SignatureBuilder left unsigned (it signs only HE and CC kits).

        Sites' and the server's startup/ and local/, admins' startup/: FLARE's server and client
        refuse to start from a startup/ that no longer matches its signature.json, and an admin's
        client refuses a tampered fed_admin.json (which names the server it hands its credentials
        to). Runs after SignatureBuilder's build, while the kits are still in FLARE's work folder.
        """
        from nvflare.lighter.constants import CtxKey
        from nvflare.lighter.utils import sign_folders

        root_key = ctx.get(CtxKey.ROOT_PRI_KEY)
        if root_key is None:
            return
        server = project.get_server()
        for participant in [*([server] if server is not None else []), *project.get_clients()]:
            for folder in (ctx.get_kit_dir(participant), ctx.get_local_dir(participant)):
                if not os.path.exists(os.path.join(folder, ProvFileName.SIGNATURE_JSON)):
                    sign_folders(folder, root_key, signature_file=ProvFileName.SIGNATURE_JSON)
        for admin in project.get_admins():
            kit = ctx.get_kit_dir(admin)
            if not os.path.exists(os.path.join(kit, ProvFileName.SIGNATURE_JSON)):
                sign_folders(kit, root_key, signature_file=ProvFileName.SIGNATURE_JSON)

    def _build_server(self, local_dir: str) -> None:
        admit_clinfed(Path(local_dir))
        for name in SERVER_FILES:
            shutil.copyfile(self.templates / name, Path(local_dir) / name)
