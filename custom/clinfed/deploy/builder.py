"""A FLARE provisioning Builder that makes FLARE's startup kits clinfed kits.

FLARE's builders issue certificates (CertBuilder), the CKKS key pair (HEBuilder) and the kit files
(StaticFileBuilder), and SignatureBuilder signs them. Two things a clinfed federation needs are not
theirs to know:

- each hospital's local policy (``workspace_templates/``: resources.json with the "clinfed" section
  and the class allow-list, privacy.json, authorization.json) in its kit's ``local/``;
- a server whose class allow-list admits ``clinfed.`` (jobs carry no code, so the server builds
  ``clinfed.fl.controller.SecureFedAvg`` from the installed package and its default allow-list,
  FLARE's own classes only, would refuse it).

It runs after HEBuilder and before SignatureBuilder, so FLARE signs the kits as they ship (and it
signs the admins' kits, which SignatureBuilder leaves unsigned). Given
``he_client_context`` (the federation's existing secret-key context), it replaces the fresh key pair
HEBuilder just made: a site added later must decrypt what the running federation encrypts.
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


def server_context_bytes(client_context: bytes) -> bytes:
    """The server's view of a site context, serialised the way HEBuilder does: no secret key.

    HEBuilder's contexts are symmetric (no public key); the server keeps only the parameters and
    relinearisation keys, which is enough to add ciphertexts and never enough to decrypt.
    """
    import tenseal as ts

    ctx = ts.context_from(client_context)
    data = ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
    if ts.context_from(data).is_private():
        raise RuntimeError("server context still holds the secret key")
    return data


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
    def __init__(self, templates: str | None = None, he_client_context: str | None = None):
        """
        Args:
            templates: folder with the site-local files (default: the bundle's workspace_templates/).
            he_client_context: path of the federation's existing client_context.tenseal; when set,
                every kit in this run gets that key (and the server its public part) instead of
                HEBuilder's new one. Used by ``clinfed provision --add-site``.
        """
        self.templates = Path(templates) if templates else default_templates_dir()
        self.he_client_context = Path(he_client_context) if he_client_context else None

    def initialize(self, project: Project, ctx: ProvisionContext):
        missing = [name for name in SITE_FILES if not (self.templates / name).is_file()]
        if missing:
            raise ValueError(f"{self.templates}: missing site template(s) {', '.join(missing)}")
        if self.he_client_context is not None and not self.he_client_context.is_file():
            raise ValueError(f"{self.he_client_context}: no such client context")

    def build(self, project: Project, ctx: ProvisionContext):
        server = project.get_server()
        if server is not None:
            self._build_server(ctx.get_local_dir(server))
        for client in project.get_clients():
            local = Path(ctx.get_local_dir(client))
            for name in SITE_FILES:
                shutil.copyfile(self.templates / name, local / name)
        if self.he_client_context is not None:
            self._reuse_federation_key(project, ctx)
        for client in project.get_clients():  # HEBuilder leaves the secret key world-readable
            secret = Path(ctx.get_kit_dir(client)) / ProvFileName.CLIENT_CONTEXT_TENSEAL
            if secret.exists():
                os.chmod(secret, 0o600)

    def finalize(self, project: Project, ctx: ProvisionContext):
        """Sign the admins' startup folders too (SignatureBuilder signs only HE and CC kits).

        An admin's fed_admin.json names the server it hands its credentials to; with signature.json
        present FLARE's admin client refuses a tampered one. Runs after SignatureBuilder's build, while
        the kits are still in FLARE's work folder.
        """
        from nvflare.lighter.constants import CtxKey
        from nvflare.lighter.utils import sign_folders

        root_key = ctx.get(CtxKey.ROOT_PRI_KEY)
        if root_key is None:
            return
        for admin in project.get_admins():
            kit = ctx.get_kit_dir(admin)
            if not os.path.exists(os.path.join(kit, ProvFileName.SIGNATURE_JSON)):
                sign_folders(kit, root_key, signature_file=ProvFileName.SIGNATURE_JSON)

    def _build_server(self, local_dir: str) -> None:
        admit_clinfed(Path(local_dir))
        for name in SERVER_FILES:
            shutil.copyfile(self.templates / name, Path(local_dir) / name)

    def _reuse_federation_key(self, project: Project, ctx: ProvisionContext) -> None:
        secret = self.he_client_context.read_bytes()
        for client in project.get_clients():
            _write(Path(ctx.get_kit_dir(client)) / ProvFileName.CLIENT_CONTEXT_TENSEAL, secret, 0o600)
        server = project.get_server()
        if server is not None:
            _write(
                Path(ctx.get_kit_dir(server)) / ProvFileName.SERVER_CONTEXT_TENSEAL, server_context_bytes(secret), 0o644
            )


def _write(path: Path, data: bytes, mode: int) -> None:
    path.write_bytes(data)
    os.chmod(path, mode)
