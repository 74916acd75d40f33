"""The deployment subcommands of `clinfed`: provision, up, down, submit, poc.

`add_parsers(subparsers)` registers them on the CLI's argparse subparsers, sets each one's
`handler` default and returns {command: handler}; each handler takes the parsed arguments and
returns the exit status. Bad input (a missing file, an unknown job, a name FLARE would reject) is
one line on stderr and status 2; a step that fails at run time (a refused submission, a site that
does not connect, a job that does not complete) is one line and status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from clinfed.argtypes import positive_float, positive_int
from clinfed.deploy.federation import DeployError

Handler = Callable[[argparse.Namespace], int]


def _one_line_errors(command: str) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        @functools.wraps(handler)
        def run(args: argparse.Namespace) -> int:
            try:
                with _quiet_flare():
                    return handler(args)
            except ValueError as exc:
                print(f"clinfed {command}: {_first_line(exc)}", file=sys.stderr)
                return 2
            except DeployError as exc:
                print(f"clinfed {command}: {_first_line(exc)}", file=sys.stderr)
                return 1

        return run

    return wrap


@contextlib.contextmanager
def _quiet_flare():
    """FLARE's admin client logs every failed connection attempt; the command reports the outcome itself."""
    logger = logging.getLogger("nvflare")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def cmd_provision(args: argparse.Namespace) -> int:
    from clinfed.deploy.federation import find_kits, is_loopback, service_address
    from clinfed.deploy.provision import add_site, provision

    if args.org and not args.add_site:
        raise ValueError("--org goes with --add-site")
    if args.add_site:
        kit = add_site(args.add_site, args.project, args.out, org=args.org)
        print(f"issued a kit for {args.add_site}: {kit} (no CKKS key: a hospital hands it over once the site runs)")
        print(
            f"hand that folder to the site; to join it here: clinfed up --kits {kit.parent} "
            "(runs the key exchange for the new site)"
        )
        return 0
    kits = provision(args.project, args.out)
    found = find_kits(kits)
    for kit in found:
        print(f"{kit.role:<7} {kit.name:<28} {kit.path}")
    print(f"kits: {kits} (no CKKS key in any of them: the hospitals make and share it, docs/keys.md)")
    server = next(k for k in found if k.role == "server")
    if is_loopback(service_address(server)[0]):
        print(f"next: clinfed up --kits {kits}")
    else:
        print(
            "next: hand each participant its own folder; each starts it with startup/start.sh; "
            "then, as the project admin: clinfed submit key_exchange --kit <admin kit> --wait"
        )
    return 0


@_one_line_errors("up")
def cmd_up(args: argparse.Namespace) -> int:
    from clinfed.deploy.federation import resolve_kits_dir, up

    kits = resolve_kits_dir(args.kits)
    pids = up(kits, timeout=args.timeout)
    for name, pid in sorted(pids.items()):
        print(f"{name:<28} pid {pid}")
    fingerprint = _key_fingerprint(kits)
    if fingerprint:
        print(f"CKKS key {fingerprint} (the server holds its public context only)")
    print(f"federation up from {kits} (stop it with: clinfed down --kits {kits})")
    return 0


def _key_fingerprint(kits: Path) -> str | None:
    """The federation's key fingerprint, from the server's public context (never from a site's key)."""
    from clinfed.deploy.federation import find_kits
    from clinfed.fl.participant import SERVER_CONTEXT_FILE, find_context_file
    from clinfed.he.context import context_fingerprint, load_server_context

    server = next((k for k in find_kits(kits) if k.role == "server"), None)
    path = find_context_file(server.path, SERVER_CONTEXT_FILE) if server else None
    return context_fingerprint(load_server_context(path)) if path else None


@_one_line_errors("down")
def cmd_down(args: argparse.Namespace) -> int:
    from clinfed.deploy.federation import down, resolve_kits_dir

    kits = resolve_kits_dir(args.kits)
    stopped = down(kits)
    print(f"stopped {len(stopped)} process(es) started from {kits}")
    return 0


@_one_line_errors("submit")
def cmd_submit(args: argparse.Namespace) -> int:
    from clinfed.deploy.submit import submit

    out = args.out
    wait = args.wait or out is not None
    result = submit(
        args.job,
        args.kit,
        wait=wait,
        out=out,
        sites=args.sites,
        rounds=args.rounds,
        encrypt=not args.no_encrypt,
        epsilon=args.epsilon,
        timeout=args.timeout,
    )
    print(f"job {result.job_id}: {result.status}")
    if result.summary is not None and result.summary.get("job") == "key_exchange":
        summary = result.summary
        print(f"key exchange {summary.get('status')}: key {summary.get('fingerprint')} held by {summary.get('holder')}")
        for site, entry in sorted(summary.get("sites", {}).items()):
            print(f"{site:<28} {entry.get('status')}: {entry.get('reason', '')}")
        print(f"summary: {Path(out).resolve() / 'summary.json'}")
        return 0 if result.completed and summary.get("status") == "ok" else 1
    if result.summary is not None:
        summary = result.summary
        final = summary.get("final", {}).get("metrics", {})
        print(
            f"encrypted: {summary.get('encrypted')}  rounds completed: {summary.get('rounds_completed')}  "
            + ", ".join(f"{k}={v:.4f}" for k, v in final.items())
        )
        for rnd in summary.get("rounds", []):
            for site, entry in sorted(rnd["sites"].items()):
                if entry.get("status") != "ok":
                    print(f"round {rnd['round']}: {site} {entry.get('status')}: {entry.get('reason', '')}")
        print(f"summary: {Path(out).resolve() / 'summary.json'}")
    if not wait:
        return 0
    summary = result.summary or {}
    nothing_trained = bool(summary.get("rounds")) and summary.get("rounds_completed", 0) == 0
    return 0 if result.completed and not nothing_trained else 1


@_one_line_errors("poc")
def cmd_poc(args: argparse.Namespace) -> int:
    from clinfed.deploy import poc

    if args.poc_command == "prepare":
        kits = poc.prepare(args.workspace, sites=args.sites)
        print(f"POC kits: {kits}")
        print(
            f"next: clinfed poc start --workspace {args.workspace}; "
            f"clinfed submit breast_cancer_dp --kit {kits / 'admin@clinfed.local'} --wait --out out/poc"
        )
    elif args.poc_command == "start":
        print(poc.start(args.workspace, timeout=args.timeout).strip())
    else:
        print(poc.stop(args.workspace).strip())
    return 0


# --- parsers -------------------------------------------------------------------------------------
def add_parsers(subparsers) -> dict[str, Handler]:
    """Register provision / up / down / submit / poc on `subparsers`; returns {command: handler}."""
    from clinfed.deploy.poc import DEFAULT_PROJECT

    prov = subparsers.add_parser("provision", help="issue signed startup kits with FLARE's provisioner")
    prov.add_argument("--project", type=Path, default=DEFAULT_PROJECT, help="FLARE project file (provisioning/*.yml)")
    prov.add_argument("--out", type=Path, required=True, help="provisioning folder (kits go to OUT/<project>/prod_00)")
    prov.add_argument("--add-site", metavar="NAME", default=None, help="issue a kit for one more site")
    prov.add_argument("--org", default=None, help="organisation of the added site (default: from its name)")

    up = subparsers.add_parser("up", help="start the server and sites from their kits on this host")
    up.add_argument("--kits", type=Path, required=True, help="kits folder (or the provisioning folder)")
    up.add_argument("--timeout", type=positive_float, default=180.0, help="seconds to wait for the sites to connect")

    down = subparsers.add_parser("down", help="stop what `clinfed up` started from these kits")
    down.add_argument("--kits", type=Path, required=True)

    sub = subparsers.add_parser("submit", help="submit a job as an admin through FLARE's API")
    sub.add_argument("job", help="bundled job name, or an exported job folder")
    sub.add_argument("--kit", type=Path, required=True, help="the submitting admin's startup kit")
    sub.add_argument("--wait", action="store_true", help="wait for the job to finish")
    sub.add_argument("--out", type=Path, default=None, help="download the result here (implies --wait)")
    sub.add_argument("--sites", type=positive_int, default=None, help="default: the sites connected now")
    sub.add_argument("--rounds", type=positive_int, default=None)
    sub.add_argument("--no-encrypt", action="store_true", help="plaintext updates (for comparison)")
    sub.add_argument("--epsilon", type=positive_float, default=None, help="target ε per site for this job")
    sub.add_argument("--timeout", type=positive_float, default=3600.0, help="seconds to wait for the job")

    poc = subparsers.add_parser("poc", help="FLARE's POC mode with clinfed's kits (nvflare poc)")
    poc_sub = poc.add_subparsers(dest="poc_command", required=True)
    for name in ("prepare", "start", "stop"):
        p = poc_sub.add_parser(name, help=f"nvflare poc {name}")
        p.add_argument("--workspace", type=Path, default=Path("poc"), help="POC workspace (default ./poc)")
        if name == "prepare":
            p.add_argument("--sites", type=positive_int, default=3)
        if name == "start":
            p.add_argument("--timeout", type=positive_int, default=120)

    handlers = {"provision": cmd_provision, "up": cmd_up, "down": cmd_down, "submit": cmd_submit, "poc": cmd_poc}
    for parser, handler in zip((prov, up, down, sub, poc), handlers.values(), strict=True):
        parser.set_defaults(handler=handler)
    return handlers
