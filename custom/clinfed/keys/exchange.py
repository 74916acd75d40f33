"""`key_exchange`: a hospital makes the CKKS key pair and hands it to the other hospitals, through FLARE.

Why a job: the kits carry no key (the operator must never hold one, `clinfed.deploy.provision`), so
once the kits run, the sites need the federation's secret key and the server its public context.
The only channel between hospitals is the federation itself, whose server is honest-but-curious,
so the key travels as bundles only the addressed hospital can open (:mod:`clinfed.keys.bundle`).

The protocol, three tasks (server: :class:`KeyExchangeController`, sites: :class:`KeyExchangeExecutor`):

1. ``key_hello`` to every site: each answers with its kit certificate (``startup/client.crt``) and
   the fingerprint of the context it already holds, if any.
2. ``key_issue`` to the *key holder*: the first site (by name) that already holds a key (so a site
   added later gets the running federation's key), else the first site. It gets the certificates of
   the sites without a key, checks each against its own ``startup/rootCA.pem`` and the site name it
   is for (not the server's, not an admin's), generates the key pair if it has none
   (``local/client_context.tenseal``, 0600), and answers with one signed bundle per site, its own
   certificate and the *public* context.
3. The server keeps the public context as ``local/server_context.tenseal`` (refusing one with the
   secret key) and sends ``key_install`` to each site without a key: its bundle and the holder's
   certificate. The site checks the holder's certificate (another site's, from its root CA), the
   signature, decrypts with its own ``startup/client.key``, checks the key's fingerprint against
   the bundle's and the server's public context, and writes ``local/client_context.tenseal``
   (0600). A site that already holds a *different* key refuses to replace it.

The server sees certificates, ciphertext bundles and the public context; kit private keys never
leave their sites. Every participant writes an audit record with the fingerprint (``key_issued``,
``key_received``, ``server_context``), never key bytes. The server's run folder gets summary.json:
``{"job", "status", "reason", "fingerprint", "holder", "sites": {site: {"status", "reason"}}}``.

A hospital may restrict whom it hands the key to: ``"key_recipients": ["site-2", ...]`` in the
"clinfed" section of its ``local/resources.json``; a site not listed is refused by name.

Key custody against a malicious server and operator (issue 22). Whoever holds the root CA key can
mint a second, valid certificate named ``site-2``, and the server chooses which certificate the holder
sees. So the holder seals the key only to a certificate it *pinned*: the SHA-256 of each recipient's
certificate is written to ``local/key_recipients_pinned.json`` when the holder first hands it the key,
at the federation's first exchange (when it generates the key), and a later, different certificate
under that name is refused by name. After that first exchange a *new* site gets the key only when the
holder hospital's admin lists its certificate's SHA-256 under ``"key_recipient_certificates":
{"site-4": "<sha256>"}`` in the holder's policy: adding a hospital takes a hospital's action, not only
the server's. Every bundle names the key-exchange run it was made in (the FLARE job id, the same at
every participant) and a nonce; a site refuses a bundle from another run and one it has seen before,
so an old bundle replayed after a rotation is refused.

Deployment only: it needs the sites' FLARE kits (certificates); in the simulator there are none.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from nvflare.apis.controller_spec import Task
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.impl.controller import Controller
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from clinfed.audit import AuditLog
from clinfed.errors import SiteRefusal
from clinfed.fl.participant import (
    SERVER_CONTEXT_FILE,
    SITE_CONTEXT_FILE,
    find_context_file,
    participant_root,
)
from clinfed.keys.bundle import (
    KeyExchangeError,
    bundle_header,
    check_site_certificate,
    open_sealed,
    public_context_fingerprint,
    seal,
    secret_context_fingerprint,
)
from clinfed.textio import one_line, write_private

HELLO_TASK = "key_hello"
ISSUE_TASK = "key_issue"
INSTALL_TASK = "key_install"
SUMMARY_FILE = "summary.json"
POLICY_RECIPIENTS = "key_recipients"
POLICY_CERTIFICATES = "key_recipient_certificates"  # {site: sha256 of its kit certificate}, set by the admin
PINNED_FILE = "key_recipients_pinned.json"  # local/: the certificates this holder handed the key to
SEEN_FILE = "key_bundles_seen.json"  # local/: ids of the bundles this site installed


# --- what a participant holds ---------------------------------------------------------------------
def _kit_file(root: Path, name: str, site: str) -> bytes:
    path = root / "startup" / name
    try:
        return path.read_bytes()
    except OSError:
        raise KeyExchangeError(f"{site}: no {path} (the key exchange needs the site's FLARE kit)") from None


def server_name_of(root: Path) -> str | None:
    """The server's name from the site's own kit, so a site never takes the server's certificate for a site's."""
    path = root / "startup" / "fed_client.json"
    if not path.is_file():
        return None
    server = (json.loads(path.read_text()).get("servers") or [{}])[0]
    return server.get("identity") or server.get("service", {}).get("target", "").rpartition(":")[0] or None


def held_fingerprint(root: Path, site: str) -> str | None:
    """Fingerprint of the secret context this site holds in `local/`, None if none.

    A context in `startup/` came with the kit, that is from the operator (FLARE's HEBuilder puts it
    there): whoever made it can decrypt everything encrypted under it, so it is refused, never used
    or handed on.
    """
    try:
        path = find_context_file(root, SITE_CONTEXT_FILE)
    except SiteRefusal as exc:
        raise KeyExchangeError(one_line(exc, site)) from None
    return secret_context_fingerprint(path.read_bytes(), f"{site} ({path})") if path else None


def _cert_digest(pem: bytes) -> str:
    return hashlib.sha256(pem).hexdigest()


def _policy(root: Path) -> dict:
    path = root / "local" / "resources.json"
    return json.loads(path.read_text()).get("clinfed", {}) if path.is_file() else {}


def _recipients_allowed(root: Path) -> list[str] | None:
    allowed = _policy(root).get(POLICY_RECIPIENTS)
    return None if allowed is None else [str(s) for s in allowed]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def allow_recipient_certificate(root: Path, site: str, cert_pem: bytes) -> str:
    """What a holder hospital's admin does to let a new site receive the key: list the SHA-256 of that
    site's kit certificate (checked out of band) in the holder's own policy. Returns the digest."""
    path = root / "local" / "resources.json"
    data = _read_json(path) or {"format_version": 2}
    section = data.setdefault("clinfed", {})
    digest = _cert_digest(cert_pem)
    section.setdefault(POLICY_CERTIFICATES, {})[site] = digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return digest


def _check_pinned(root: Path, holder: str, recipient: str, pem: bytes, bootstrap: bool) -> str:
    """The certificate's digest if this holder may seal the key to it (see the module docstring)."""
    digest = _cert_digest(pem)
    listed = {str(k): str(v) for k, v in (_policy(root).get(POLICY_CERTIFICATES) or {}).items()}
    pinned = _read_json(root / "local" / PINNED_FILE)
    want = listed.get(recipient) or pinned.get(recipient)
    if want is not None and want != digest:
        raise KeyExchangeError(
            f"{holder}: the certificate offered for {recipient} (sha256 {digest[:16]}…) is not the one this hospital "
            f"pinned ({want[:16]}…): a second certificate under that name; refusing"
        )
    if want is None and not bootstrap:
        raise KeyExchangeError(
            f"{holder}: {recipient} is new to this federation: its admin must list its certificate (sha256 "
            f"{digest[:16]}…) under clinfed.{POLICY_CERTIFICATES} in local/resources.json before it gets the key"
        )
    return digest


def _pin(root: Path, recipient: str, digest: str) -> None:
    path = root / "local" / PINNED_FILE
    pinned = _read_json(path)
    pinned[recipient] = digest
    write_private(path, json.dumps(pinned, indent=2, sort_keys=True), 0o600)


# --- sites ---------------------------------------------------------------------------------------
class KeyExchangeExecutor(Executor):
    """A site's side: show its certificate, issue the key (as holder), or install a key sent to it."""

    def __init__(self, job_label: str = "key_exchange"):
        super().__init__()
        self.job_label = job_label
        self._run = ""

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        handlers = {HELLO_TASK: self._hello, ISSUE_TASK: self._issue, INSTALL_TASK: self._install}
        if task_name not in handlers:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        site = fl_ctx.get_identity_name()
        root = participant_root(fl_ctx)
        self._run = str(fl_ctx.get_job_id() or "")  # the bundles of this exchange name it
        try:
            data = handlers[task_name](root, site, shareable)
        except Exception as exc:  # reported by name in the server's summary, never a crash of the job
            data = {"status": "failed", "reason": one_line(exc, site)}
            self.log_error(fl_ctx, data["reason"])
        # A DXO, so the site's privacy filter (clinfed.fl.privacy_filter) can see it carries no weights.
        return DXO(data_kind=DataKind.APP_DEFINED, data=data).to_shareable()

    def _hello(self, root: Path, site: str, _: Shareable) -> dict:
        return {
            "status": "ok",
            "certificate": _kit_file(root, "client.crt", site),
            "fingerprint": held_fingerprint(root, site) or "",
        }

    def _issue(self, root: Path, site: str, request: Shareable) -> dict:
        import tenseal as ts

        from clinfed.he.context import context_fingerprint, create_context, public_context

        root_ca = _kit_file(root, "rootCA.pem", site)
        own_key = _kit_file(root, "client.key", site)
        server_name = server_name_of(root)
        audit = AuditLog(root, site)
        path = root / "local" / SITE_CONTEXT_FILE
        generated = held_fingerprint(root, site) is None  # also refuses a key that came with the kit
        if generated:
            ctx = create_context()
            secret = ctx.serialize(save_secret_key=True)
            fingerprint = context_fingerprint(ctx)
            write_private(path, secret, 0o600)
            audit.append("key_generated", job=self.job_label, site=site, fingerprint=fingerprint)
        else:
            secret = path.read_bytes()
            fingerprint = secret_context_fingerprint(secret, f"{site} ({path})")
            ctx = ts.context_from(secret)
        allowed = _recipients_allowed(root)
        bundles: dict[str, bytes] = {}
        refused: dict[str, str] = {}
        for recipient, pem in sorted((request.get("certificates") or {}).items()):
            try:
                if recipient == site:
                    raise KeyExchangeError(f"{site}: asked to send the key to itself")
                if allowed is not None and recipient not in allowed:
                    raise KeyExchangeError(f"{site}: local policy does not list {recipient} in {POLICY_RECIPIENTS}")
                cert = check_site_certificate(pem, root_ca, recipient, server_name)
                digest = _check_pinned(root, site, recipient, pem, bootstrap=generated)
                bundles[recipient] = seal(secret, fingerprint, site, own_key, recipient, cert, run=self._run)
                _pin(root, recipient, digest)
            except KeyExchangeError as exc:
                refused[recipient] = one_line(exc, site)
                audit.append("key_refused", job=self.job_label, site=recipient, reason=refused[recipient])
                continue
            audit.append(
                "key_issued", job=self.job_label, site=recipient, fingerprint=fingerprint, certificate=_cert_digest(pem)
            )
        public = public_context(ctx).serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)
        return {
            "status": "ok",
            "fingerprint": fingerprint,
            "public_context": public,
            "certificate": _kit_file(root, "client.crt", site),
            "bundles": bundles,
            "refused": refused,
            "generated": generated,
        }

    def _install(self, root: Path, site: str, request: Shareable) -> dict:
        bundle = request.get("bundle") or b""
        expected = str(request.get("fingerprint") or "")
        held = held_fingerprint(root, site)
        if held is not None:
            if held == expected:
                return {"status": "ok", "reason": f"{site}: already holds this key", "fingerprint": held}
            raise KeyExchangeError(
                f"{site}: already holds a different key ({held[:16]}…), refusing to replace it with {expected[:16]}…"
            )
        opened = open_sealed(
            bundle,
            site,
            _kit_file(root, "client.key", site),
            request.get("sender_certificate") or b"",
            _kit_file(root, "rootCA.pem", site),
            server_name_of(root),
        )
        if opened.run != self._run:
            raise KeyExchangeError(
                f"{site}: the key bundle from {opened.sender} was made in key-exchange run {opened.run or '?'}, "
                f"not this run ({self._run or '?'}): a replayed bundle; refusing"
            )
        seen_path = root / "local" / SEEN_FILE
        seen = _read_json(seen_path)
        if opened.bundle_id in seen:
            raise KeyExchangeError(
                f"{site}: the key bundle from {opened.sender} was installed before: a replay; refusing"
            )
        fingerprint = secret_context_fingerprint(opened.context, site)
        if fingerprint != opened.fingerprint:
            raise KeyExchangeError(f"{site}: the key from {opened.sender} does not match the fingerprint it came with")
        if fingerprint != expected:
            raise KeyExchangeError(
                f"{site}: the key from {opened.sender} ({fingerprint[:16]}…) does not match the server's "
                f"public context ({expected[:16]}…)"
            )
        write_private(root / "local" / SITE_CONTEXT_FILE, opened.context, 0o600)
        seen[opened.bundle_id] = opened.run
        write_private(seen_path, json.dumps(seen, indent=2, sort_keys=True), 0o600)
        AuditLog(root, site).append(
            "key_received", job=self.job_label, site=site, sender=opened.sender, fingerprint=fingerprint
        )
        return {"status": "ok", "reason": f"{site}: received the key from {opened.sender}", "fingerprint": fingerprint}


# --- server --------------------------------------------------------------------------------------
def _answer(result: Shareable | None, site: str) -> dict:
    """A site's reply as a dict; FLARE's error replies (no DXO) become a failure naming the return code."""
    if result is None:
        return {}
    try:
        return dict(from_shareable(result).data or {})
    except ValueError:
        return {"status": "failed", "reason": f"{site}: task failed (FLARE return code {result.get_return_code()})"}


class KeyExchangeController(Controller):
    """The server's side: relays certificates and bundles, keeps the public context, writes summary.json."""

    def __init__(self, job_label: str = "key_exchange", task_timeout: int = 120):
        super().__init__()
        self.job_label, self.task_timeout = job_label, task_timeout

    def start_controller(self, fl_ctx: FLContext) -> None:
        pass

    def stop_controller(self, fl_ctx: FLContext) -> None:
        pass

    def process_result_of_unknown_task(self, client, task_name, client_task_id, result, fl_ctx) -> None:
        pass

    def _ask(self, name: str, data: Shareable, sites: list[str], fl_ctx: FLContext, abort: Signal) -> dict[str, dict]:
        task = Task(name=name, data=data, timeout=self.task_timeout)
        self.broadcast_and_wait(task, fl_ctx, targets=sites, min_responses=len(sites), abort_signal=abort)
        return {ct.client.name: _answer(ct.result, ct.client.name) for ct in task.client_tasks}

    def _ask_each(self, name: str, data: dict[str, Shareable], fl_ctx: FLContext, abort: Signal) -> dict[str, dict]:
        """One task per site, with its own data, all in flight together."""
        tasks = {site: Task(name=name, data=shareable, timeout=self.task_timeout) for site, shareable in data.items()}
        for site, task in tasks.items():
            self.send(task, fl_ctx, targets=[site])
        while any(t.completion_status is None for t in tasks.values()) and not abort.triggered:
            time.sleep(0.2)
        return {site: _answer(t.client_tasks[-1].result, site) if t.client_tasks else {} for site, t in tasks.items()}

    def control_flow(self, abort_signal: Signal, fl_ctx: FLContext) -> None:
        sites = sorted(c.name for c in fl_ctx.get_engine().get_clients())
        root = participant_root(fl_ctx, "server")
        audit = AuditLog(root, "server")
        audit.append("job_start", job=self.job_label, sites=sites)
        entries = {s: {"status": "failed", "reason": f"{s}: no answer"} for s in sites}
        summary = {"job": self.job_label, "status": "failed", "reason": "", "fingerprint": None, "holder": None}
        try:
            self._exchange(sites, entries, summary, root, audit, fl_ctx, abort_signal)
        except Exception as exc:  # the summary says what failed; the job itself completes
            summary["reason"] = one_line(exc)
        failed = [e["reason"] for e in entries.values() if e["status"] != "ok"]
        if not summary["reason"] and failed:
            summary["reason"] = "; ".join(failed)
        summary["status"] = "ok" if not summary["reason"] else "failed"
        summary["sites"] = entries
        audit.append("job_end", job=self.job_label, status=summary["status"], fingerprint=summary["fingerprint"])
        run_dir = Path(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()))
        (run_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        if summary["status"] != "ok":
            self.log_error(fl_ctx, f"key_exchange: {summary['reason']}")

    def _exchange(self, sites, entries, summary, root: Path, audit: AuditLog, fl_ctx, abort) -> None:
        hello = self._ask(HELLO_TASK, Shareable(), sites, fl_ctx, abort)
        held: dict[str, str] = {}
        certificates: dict[str, bytes] = {}
        for site in sites:
            answer = hello.get(site) or {}
            if answer.get("status") != "ok":
                entries[site] = {"status": "failed", "reason": answer.get("reason") or f"{site}: no answer"}
                continue
            certificates[site] = answer["certificate"]
            if answer.get("fingerprint"):
                held[site] = answer["fingerprint"]
        if len(set(held.values())) > 1:
            keys = ", ".join(f"{s} {fp[:16]}…" for s, fp in sorted(held.items()))
            raise KeyExchangeError(f"sites hold different keys ({keys}); refusing to pick one")
        if not certificates:
            raise KeyExchangeError("no site answered")
        holder = min(held) if held else min(certificates)
        summary["holder"] = holder
        recipients = {s: pem for s, pem in certificates.items() if s not in held and s != holder}
        request = Shareable()
        request["certificates"] = recipients
        issued = self._ask(ISSUE_TASK, request, [holder], fl_ctx, abort).get(holder) or {}
        if issued.get("status") != "ok":
            entries[holder] = {"status": "failed", "reason": issued.get("reason") or f"{holder}: no answer"}
            raise KeyExchangeError(entries[holder]["reason"])
        fingerprint = str(issued["fingerprint"])
        summary["fingerprint"] = fingerprint
        what = "generated the key" if issued.get("generated") else "holds the key"
        entries[holder] = {"status": "ok", "reason": f"{holder}: {what}, issued it to {len(issued['bundles'])} site(s)"}
        for site in held:
            if site != holder:
                entries[site] = {"status": "ok", "reason": f"{site}: already holds this key"}
        self._keep_public_context(issued["public_context"], fingerprint, holder, root, audit)
        for site, reason in (issued.get("refused") or {}).items():
            entries[site] = {"status": "refused", "reason": reason}
        installs: dict[str, Shareable] = {}
        for site, bundle in issued["bundles"].items():
            if bundle_header(bundle)["recipient"] != site:  # the holder addressed it; a mix-up fails at the site anyway
                entries[site] = {"status": "failed", "reason": f"{holder}: bundle for {site} is addressed elsewhere"}
                continue
            install = Shareable()
            install.update({"bundle": bundle, "sender_certificate": issued["certificate"], "fingerprint": fingerprint})
            installs[site] = install
        for site, answer in self._ask_each(INSTALL_TASK, installs, fl_ctx, abort).items():
            if answer.get("status") == "ok":
                entries[site] = {"status": "ok", "reason": answer.get("reason", "")}
            else:
                entries[site] = {"status": "failed", "reason": answer.get("reason") or f"{site}: no answer"}

    def _keep_public_context(self, public: bytes, fingerprint: str, holder: str, root: Path, audit: AuditLog) -> None:
        got = public_context_fingerprint(public, f"public context from {holder}")
        if got != fingerprint:
            raise KeyExchangeError(f"{holder}: the public context does not match the key's fingerprint")
        existing = find_context_file(root, SERVER_CONTEXT_FILE)
        if existing is not None:
            current = public_context_fingerprint(existing.read_bytes(), f"server ({existing})")
            if current == fingerprint:
                return
            if existing.parent.name == "startup":
                raise KeyExchangeError(
                    f"server: {existing} (issued with the kit) holds another key ({current[:16]}…) than the sites"
                )
        write_private(root / "local" / SERVER_CONTEXT_FILE, public, 0o644)
        audit.append("server_context", job=self.job_label, holder=holder, fingerprint=fingerprint)


# --- the recipe ----------------------------------------------------------------------------------
class KeyExchangeRecipe(Recipe):
    """The key_exchange job: no code travels with it (`clinfed` is installed at every participant)."""

    def __init__(self, name: str, num_sites: int, task_timeout: int = 120):
        job = FedJob(name=name, min_clients=num_sites)
        job.set_app_packages(["clinfed"])
        job.to_server(KeyExchangeController(job_label=name, task_timeout=task_timeout), id="controller")
        job.to_clients(KeyExchangeExecutor(job_label=name), id="executor", tasks=[HELLO_TASK, ISSUE_TASK, INSTALL_TASK])
        self.num_sites = num_sites
        super().__init__(job)
