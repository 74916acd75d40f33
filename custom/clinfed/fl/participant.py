"""Where a participant keeps what must outlive a job: keys, privacy ledger, audit log, local policy.

In a provisioned deployment that is the participant's own workspace (its startup kit folder):
`startup/` holds what the operator issued (certificates, never a CKKS key), `local/` what the
hospital holds and edits (the CKKS context the key exchange delivered, resources.json with the
clinfed section, privacy.json, the privacy ledger), and `audit/` the hash-chained audit log.

FLARE's simulator wipes its workspace on every run and gives every participant a copy of the same
`local/`, which would both lose the ledger and hand the server the sites' secret key. So
`clinfed simulate` points each participant at a folder of its own through CLINFED_SIM_ROOT
(`<root>/<participant>/`), laid out exactly like a kit. That variable is set only by the simulator
and POC helpers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from nvflare.apis.fl_context import FLContext

from clinfed.errors import SiteRefusal

SIM_ROOT_ENV = "CLINFED_SIM_ROOT"
SITE_CONTEXT_FILE = "client_context.tenseal"  # same names as FLARE's HEBuilder
SERVER_CONTEXT_FILE = "server_context.tenseal"
RESOURCES_FILE = "resources.json"
CLINFED_SECTION = "clinfed"


def participant_root(fl_ctx: FLContext, name: str | None = None) -> Path:
    """The participant's persistent folder; the server passes name="server" (its FLARE identity
    differs between the simulator and a deployment)."""
    name = name or fl_ctx.get_identity_name()
    sim_root = os.environ.get(SIM_ROOT_ENV)
    if sim_root:
        return Path(sim_root) / name
    return Path(fl_ctx.get_engine().get_workspace().get_root_dir())


def site_index(site: str) -> int | None:
    """0-based index from a trailing number ("site-3" → 2), naming a site's part of the bundled demo data."""
    match = re.search(r"(\d+)$", site)
    return int(match.group(1)) - 1 if match else None


def site_context(root: Path, site: str):
    """The federation's secret-key context at a site (`local/`), and its fingerprint; refuses without one."""
    from clinfed.he.context import context_fingerprint, load_site_context

    path = find_context_file(root, SITE_CONTEXT_FILE)
    if path is None:
        raise SiteRefusal(f"{site}: no CKKS context ({SITE_CONTEXT_FILE}) in {root}/local; run the key_exchange job")
    ctx = load_site_context(path)
    return ctx, context_fingerprint(ctx)


def server_context(root: Path):
    """The server's public context (no secret key: `load_server_context` refuses one) and its fingerprint."""
    from clinfed.he.context import context_fingerprint, load_server_context

    path = find_context_file(root, SERVER_CONTEXT_FILE)
    if path is None:
        raise RuntimeError(f"server: no public CKKS context ({SERVER_CONTEXT_FILE}) in {root}")
    ctx = load_server_context(path)
    return ctx, context_fingerprint(ctx)


def find_context_file(root: Path, filename: str) -> Path | None:
    """The participant's own context, in `local/`: put there by the key exchange (clinfed.keys) or,
    in the simulator, by `clinfed simulate`. A context in `startup/` came with the kit, i.e. from the
    operator who provisioned it, and the operator must never hold a hospital's key: it is refused."""
    issued = root / "startup" / filename
    if issued.exists():
        raise SiteRefusal(
            f"{root.name}: {issued} came with the kit, so the operator made it; a federation key is only made "
            "at a hospital and shared through the key exchange (remove that file, see docs/keys.md)"
        )
    path = root / "local" / filename
    return path if path.exists() else None


METRIC_POLICIES = ("full", "round", "withhold")
#: metrics computed on the training batches without DP noise: released only under `metrics: full`
TRAIN_BATCH_METRICS = ("train_loss",)


#: Keys of the policy's "database" section (anything else is refused: a typo must not be ignored).
DATABASE_KEYS = ("url", "url_env", "password_env", "table", "columns")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class SiteDatabase:
    """Where this hospital's patients are: the policy's "database" section (see docs/site-policy.md).

    `url` (an SQLAlchemy URL) or `url_env` (the name of an environment variable holding one), never
    both; `password_env` optionally names a variable holding the password of a URL written without
    one. Environment variables are read when a job reads the data, not here, and no secret is kept
    in this object's repr. `table` is a table or view (``schema.name`` allowed); `columns` maps the
    variables jobs name onto this site's own column names (a variable not in it is the column of the
    same name).
    """

    url: str | None = field(default=None, repr=False)
    url_env: str | None = None
    password_env: str | None = None
    table: str = "patients"
    columns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, section, site: str) -> SiteDatabase:
        """The section validated; a one-line SiteRefusal naming the key otherwise (never echoing a URL)."""

        def refuse(why: str) -> SiteRefusal:
            return SiteRefusal(f"{site}: local policy database {why}")

        if not isinstance(section, dict):
            raise refuse("must be an object {url or url_env, table, columns}")
        unknown = sorted(str(k) for k in section if k not in DATABASE_KEYS)
        if unknown:
            raise refuse(f"has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(DATABASE_KEYS)})")
        url, url_env = section.get("url"), section.get("url_env")
        if (url is None) == (url_env is None):
            raise refuse("needs exactly one of url (an SQLAlchemy URL) or url_env (a variable holding one)")
        if url is not None and (not isinstance(url, str) or not url.strip()):
            raise refuse("url must be a non-empty string (an SQLAlchemy URL)")
        for key in ("url_env", "password_env"):
            name = section.get(key)
            if name is not None and (not isinstance(name, str) or not _ENV_NAME.fullmatch(name)):
                raise refuse(f"{key} must name an environment variable (letters, digits, _)")
        table = section.get("table", cls.table)
        if not isinstance(table, str) or not table.strip():
            raise refuse("table must be a non-empty table or view name")
        columns = section.get("columns", {})
        if not isinstance(columns, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) and v.strip() for k, v in columns.items()
        ):
            raise refuse('columns must map variable names to non-empty column names, e.g. {"time": "futime"}')
        return cls(
            url=url,
            url_env=url_env,
            password_env=section.get("password_env"),
            table=table.strip(),
            columns=dict(columns),
        )


@dataclass
class SitePolicy:
    """The hospital's own settings, from `local/resources.json` → "clinfed". A job is untrusted input:
    it cannot switch DP off, raise ε or δ above these, pick the accountant, or widen what leaves the site.

    Defaults are the safe ones, so a site without the section (or a kit from an older template) still
    refuses a job without DP.
    """

    epsilon_budget: float | None = None  # lifetime ε of the site across jobs and mechanisms
    data_dir: str | None = None
    database: SiteDatabase | None = None  # the hospital's own database; read before data_dir
    require_encryption: bool = False
    require_dp: bool = True  # a job with DP disabled is refused before training
    delta: float = 1e-5  # the site's δ: every spend is accounted at it; a job may ask for a smaller δ only
    accountant: str = "rdp"  # Opacus accountant the site composes its spends with
    max_job_epsilon: float = 10.0  # no single job may plan more than this, whatever the budget left
    metrics: str = "round"  # what metrics leave the site: "full", "round" (to metric_digits), "withhold"
    metric_digits: int = 3
    simulated_override: bool = False  # set only by `clinfed simulate --no-dp`; stated in the output
    # Disclosure floors the site owns (issue 23, item 2): a job may ask for stricter, never for less.
    min_cell: int = 5  # smallest released count (KM bins, GLM levels, cohort cells), 0 aside
    max_params_per_observation: float = 0.33  # regressions: parameters ≤ this × the site's rows (nfilter.glm)
    min_sites: int = 3  # fewest sites in any sum this site's rows enter (never below 3)
    # node policy (`clinfed.fl.node_policy`): None allows all; a list allows only what it names
    allowed_methods: tuple[str, ...] | None = None  # job names (cox_ph) or method blocks (cox)
    allowed_columns: tuple[str, ...] | None = None  # variables a job may name
    allowed_concepts: tuple[int, ...] | None = None  # OMOP concept ids a cohort definition may name

    @classmethod
    def load(cls, root: Path) -> SitePolicy:
        path = root / "local" / RESOURCES_FILE
        if not path.exists():
            return cls()
        section = json.loads(path.read_text()).get(CLINFED_SECTION, {})
        defaults = cls()
        budget = section.get("epsilon_budget")
        policy = cls(
            epsilon_budget=float(budget) if budget is not None else None,
            data_dir=section.get("data_dir"),
            database=(
                SiteDatabase.parse(section["database"], root.name) if section.get("database") is not None else None
            ),
            require_encryption=bool(section.get("require_encryption", defaults.require_encryption)),
            require_dp=bool(section.get("require_dp", defaults.require_dp)),
            delta=float(section.get("delta", defaults.delta)),
            accountant=str(section.get("accountant", defaults.accountant)),
            max_job_epsilon=float(section.get("max_job_epsilon", defaults.max_job_epsilon)),
            metrics=str(section.get("metrics", defaults.metrics)),
            metric_digits=int(section.get("metric_digits", defaults.metric_digits)),
            simulated_override=bool(section.get("simulated_override", False)),
            **_floors(section, defaults, root.name),
            **_allow_lists(section, root.name),
        )
        if not 0 < policy.delta < 1:
            raise SiteRefusal(f"{root.name}: local policy delta {policy.delta!r} is not in (0, 1)")
        if policy.metrics not in METRIC_POLICIES:
            raise SiteRefusal(f"{root.name}: local policy metrics {policy.metrics!r} is not one of {METRIC_POLICIES}")
        return policy

    def release_metrics(self, metrics: dict) -> dict:
        """The metrics this site lets out: all, rounded to `metric_digits`, or none.

        Statistics of the training batches (`TRAIN_BATCH_METRICS`: the loss over the DP-SGD batches,
        computed without noise) leave only under ``full``: by default they are withheld (issue 23).
        """
        if self.metrics == "withhold":
            return {}
        if self.metrics != "full":
            metrics = {k: v for k, v in metrics.items() if k not in TRAIN_BATCH_METRICS}
        if self.metrics == "round":
            digits = self.metric_digits
            return {k: round(float(v), digits) if isinstance(v, int | float) else v for k, v in metrics.items()}
        return dict(metrics)


def _floors(section: dict, defaults: SitePolicy, site: str) -> dict:
    """The policy's disclosure floors, checked: a typo or a value weaker than the safe minimum is refused,
    never silently replaced (a hospital that wrote `min_sites: 2` must learn it is not honoured)."""
    out = {}
    for key, kind, ok, why in (
        ("min_cell", int, lambda v: v >= 1, "an integer ≥ 1"),
        ("max_params_per_observation", float, lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
        ("min_sites", int, lambda v: v >= 3, "an integer ≥ 3"),
    ):
        value = section.get(key, getattr(defaults, key))
        try:
            good = not isinstance(value, bool) and float(value) == kind(value) and ok(kind(value))
        except (TypeError, ValueError):
            good = False
        if not good:
            raise SiteRefusal(f"{site}: local policy {key} {value!r} is not {why}")
        out[key] = kind(value)
    return out


def _allow_lists(section: dict, site: str) -> dict:
    """The node policy's allow-lists, validated: a malformed one is refused, never read as "allow all"."""
    out: dict = {}
    for key, kind in (("allowed_methods", str), ("allowed_columns", str), ("allowed_concepts", int)):
        value = section.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
            what = "names" if kind is str else "integer concept ids"
            raise SiteRefusal(f"{site}: local policy {key} must be a list of {what}")
        out[key] = tuple(value)
    return out


def write_site_policy(root: Path, **settings) -> Path:
    """Merge `settings` into `<root>/local/resources.json` → "clinfed" (used by simulate and provision)."""
    path = root / "local" / RESOURCES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"format_version": 2}
    section = data.setdefault(CLINFED_SECTION, {})
    section.update({k: v for k, v in settings.items() if v is not None})
    path.write_text(json.dumps(data, indent=2))
    return path
