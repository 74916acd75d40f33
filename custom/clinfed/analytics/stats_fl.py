"""`cohort_stats` on FLARE: encrypted two-pass federated statistics, released by one key-holding site.

What we reuse from FLARE's federated statistics (`nvflare.app_common.statistics`,
`StatisticsController` / `StatisticsExecutor`) and what we change, and why:

* Reused as is: the two-pass plan (global mean first, then Σ(x − mean)², as its ``var`` statistic
  does), its privacy cleansers `MinCountCleanser` and `HistogramBinsCleanser` (called unchanged from
  :func:`clinfed.analytics.stats.suppress`), its statistics layout (dataset → feature) in the
  summary, and `ModelController` for task dispatch, timeouts and result collection.
* Changed: `StatisticsController` receives every site's *plaintext* statistics and aggregates them
  at the server (`numeric_stats.get_global_stats`, rounded to 4 decimals). Here the server is
  honest-but-curious (DESIGN.md): it only adds CKKS ciphertexts (`clinfed.he.EncryptedSum`) and
  never holds the secret key. The sites decrypt the pass-1 sum to learn the pooled means, and one
  *release site* decrypts both sums, adds optional output-DP noise and suppresses small cells
  before anything reaches the server, so the server (and the researcher reading summary.json)
  only ever sees the cleansed release. FLARE cleanses each site's local statistics; we cleanse the
  pooled ones, which is what is released, and add cell-level and complementary suppression (see
  `stats.suppress`), which FLARE's cleansers lack.
* Changed: histogram bins are fixed from public bounds (FLARE's default bins span the federation's
  min/max, two patients' exact values, which it must first release with noise).

Flow (three tasks, recorded as three "rounds" in summary.json):

=====  ====================  ===============================================================
round  task                  what travels
=====  ====================  ===============================================================
0      ``cohort_sums``       site → server: Enc(rows, counts, Σx/scale, histograms, fine quantile
                             histograms, level counts, events and person-time/bound); server adds
1      ``cohort_deviations`` server → sites: Enc(pass-1 sum); site → server: Enc(Σ(x−mean)²/scale²)
2      ``cohort_release``    server → release site: both sums; release site → server: the
                             suppressed (and noised) release as JSON
=====  ====================  ===============================================================

Known limit (same as FedAvg's): every key-holding site that takes part in pass 2 sees the *pooled*
pass-1 aggregate unsuppressed, since it must decrypt the means. Suppression and DP protect what
leaves the key holders, not what the key holders compute together. Only one site releases, so the
server never gets two independently noised copies to average. With quantiles (``quantile_bins``),
that pooled aggregate includes the fine histograms (e.g. 200 bins per feature and group): the key
holders see finer pooled counts than anyone else; the release carries only the rounded quantiles
(`stats.release_quantiles`), none under output DP.

A site reads its rows from its `<site>.sqlite` when its policy's ``data_dir`` is a `clinfed data split`
folder (`clinfed.data.sitedb.read_site_table`, variables by name), else from its ``data.csv``, else
the bundled breast-cancer demo rows. In `--no-encrypt` comparison runs the server adds with
`clinfed.he.aggregation.PlainWeightedSum` (every site weighted 1), as plaintext FedAvg does.

A site-level problem (missing column, unreadable CSV, policy refusal) is reported as that site's
status "failed"/"refused" with a one-line reason; the others go on, and the release covers the
sites that contributed to both passes (listed in ``final.per_site``), if at least ``min_sites`` did.

What the sites enforce whatever the job or the server says (issue 12, items 5-8):

* **Three contributors at least** (`stats.MIN_CONTRIBUTORS`): a job for fewer sites is refused at
  recipe construction, the server stops when fewer than three contribute, and each site reads the
  number of vectors in a sum from its contributor slot (a 1 per site, `stats.local_sums`) and refuses
  to work on, or release, a sum of fewer than three or of another number than the server names.
* **Every DP release is charged**: before it sends its pass-1 sum, each site reserves the release's
  ε in its own privacy ledger (`clinfed.privacy.ledger`; Laplace: pure ε, added by basic composition;
  Gaussian: one RDP spend, `stats.gaussian_noise_multiplier`) against its policy's budget, and refuses
  the job when the budget cannot take it: its records are in the release.
* **The release log** (`clinfed.analytics.release_log`): before its pass-2 sum, each site works out
  from the decrypted pass-1 sum which cells an exact release would show, and refuses when its log
  says that, with an earlier release, a withheld cell would become derivable.
* **Rounded release**: counts are integers, means and std 7 significant digits, quantiles rounded to
  the fine bin grid and withheld where they would constrain a withheld cell (`stats.release`).
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from clinfed.analytics import stats
from clinfed.analytics.release_log import CohortDefinition, ReleaseLog, cells_of, data_digest
from clinfed.audit import AuditLog, payload_digest
from clinfed.data import breast_cancer as bc
from clinfed.errors import SiteDataError, SiteRefusal
from clinfed.fl import payload
from clinfed.fl.participant import (
    RESOURCES_FILE,
    SitePolicy,
    participant_root,
    server_context,
    site_context,
    site_index,
)
from clinfed.textio import json_default, one_line

PASS1_TASK = "cohort_sums"
PASS2_TASK = "cohort_deviations"
RELEASE_TASK = "cohort_release"
TASKS = (PASS1_TASK, PASS2_TASK, RELEASE_TASK)
STATS_KEY = "stats"  # the one packed vector, plaintext mode
SUMMARY_FILE = "summary.json"
COHORTS = ("all", "intersect")
MISSING = {"", "na", "nan", "null", "none"}


def settings_digest(spec: stats.StatsSpec, dp: dict | None, cohort: str) -> str:
    """What every participant must agree on before vectors can be added slot by slot."""
    return spec.digest(dp_clip=dp is not None, cohort=cohort)


def _layout_json(size: int) -> str:
    from clinfed.he.packing import flatten, layout_to_json

    return layout_to_json(flatten({STATS_KEY: np.zeros(size)})[1])


def _site_min_cell(root: Path) -> int | None:
    """The hospital's own floor for small cells (`local/resources.json` → clinfed.min_cell): a job can
    raise the threshold, never lower it below the site's."""
    path = root / "local" / RESOURCES_FILE
    if not path.exists():
        return None
    value = json.loads(path.read_text()).get("clinfed", {}).get("min_cell")
    return int(value) if value is not None else None


# --- the site's table ---------------------------------------------------------------------------------------
def _cell_float(site: str, path: Path, line: int, column: str, text: str) -> float:
    if text is None or text.strip().lower() in MISSING:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise SiteDataError(f"{site}: {path} line {line}, column '{column}': '{text}' is not a number") from None


def read_cohort_csv(
    site: str,
    data_dir: str | Path,
    features: list[str],
    group_column: str,
    id_column: str | None = None,
    other_columns: list[str] | None = None,
) -> tuple[np.ndarray, list[str], list[str] | None] | tuple[np.ndarray, list[str], list[str] | None, dict]:
    """(values, group labels, ids) from the site's `<data_dir>/data.csv` (or its only CSV); with
    ``other_columns`` (proportion and rate columns) a fourth item, {column: cells as text, None missing}.

    Empty or NA cells are missing values (skipped per feature); a missing *column* is an error that
    names the site and the column, since every site must summarise the same features. An empty
    ``group_column`` puts every row in ``all`` only.
    """
    path = bc.find_site_csv(site, data_dir)
    others = list(other_columns or [])
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        needed = [*features, *([group_column] if group_column else []), *([id_column] if id_column else []), *others]
        for col in needed:
            if col not in header:
                raise SiteDataError(f"{site}: {path} lacks column '{col}'")
        rows = list(reader)
    x = np.array(
        [[_cell_float(site, path, i, f, r[f]) for f in features] for i, r in enumerate(rows, start=2)],
        dtype=np.float64,
    ).reshape(len(rows), len(features))
    labels = [(r[group_column] or "").strip() if group_column else "" for r in rows]
    ids = [(r[id_column] or "").strip() for r in rows] if id_column else None
    if other_columns is None:
        return x, labels, ids
    extra = {c: [None if (r[c] or "").strip().lower() in MISSING else r[c].strip() for r in rows] for c in others}
    return x, labels, ids, extra


def read_cohort_db(
    site: str, policy: SitePolicy, features: list[str], group_column: str, id_column: str | None, others: list[str]
) -> tuple[np.ndarray, list[str], list[str] | None, dict]:
    """(values, group labels, ids, {column: values}) from the site's database: its policy's ``database``
    (SQLAlchemy URL + column mapping) or the `<site>.sqlite` of a `clinfed data split` folder, through
    `clinfed.data.source.site_table`: variables by name, never SQL."""
    from clinfed.data.source import site_table

    wanted = [*features, *([group_column] if group_column else []), *([id_column] if id_column else []), *others]
    table = site_table(policy, site, list(dict.fromkeys(wanted)))
    n = len(next(iter(table.values())))
    cols = []
    for f in features:
        try:
            cols.append(stats.numeric_column(table[f], f))
        except ValueError as exc:
            raise SiteDataError(f"{site}: {exc} in its database") from None
    x = np.column_stack(cols) if cols else np.zeros((n, 0))
    labels = [stats.level_text(v) or "" for v in table[group_column]] if group_column else [""] * n
    ids = [stats.level_text(v) or "" for v in table[id_column]] if id_column else None
    return x, labels, ids, {c: table[c] for c in others}


def _same(label: str, value: object) -> bool:
    try:
        return float(label) == float(value)  # "1", "1.0" and 1 are one group
    except (TypeError, ValueError):
        return label == str(value)


def group_masks(labels: list, spec: stats.StatsSpec, group_values: dict) -> dict[str, np.ndarray]:
    """Row masks per group: "all" is every row; each other group the rows whose label equals its value."""
    n = len(labels)
    masks = {stats.ALL: np.ones(n, dtype=bool)}
    for g in spec.groups[1:]:
        masks[g] = np.array([_same(str(label), group_values[g]) for label in labels], dtype=bool).reshape(n)
    return masks


# --- site side ------------------------------------------------------------------------------------------
class CohortStatsExecutor(Executor):
    """A site's part of `cohort_stats`: pack and encrypt its partial sums, and (if chosen) release.

    Never raises into FLARE for a site-level problem: it answers with status "failed" or "refused"
    and a one-line reason naming the site, as `clinfed.fl.executor.DPTrainExecutor` does.
    """

    def __init__(
        self,
        spec: dict | None = None,
        group_values: dict | None = None,
        group_column: str = "target",
        cohort: str = "all",
        id_column: str = "patient_id",
        encrypt: bool = True,
        num_sites: int = 3,
        min_cell: int = 10,
        max_bins_percent: float | None = 10.0,
        dp: dict | None = None,
        job_label: str = "cohort_stats",
    ):
        """
        Args:
            spec: `StatsSpec.to_dict()`: features, public bounds, groups ("all" first), bins.
            group_values: group name → the value of ``group_column`` that puts a row in it.
            group_column: column of a site's own CSV that defines the groups (bundled data: the label).
            cohort: "all" rows, or "intersect": only rows whose ``id_column`` is in the site's PSI result
                (`local/psi/intersection.txt`, written by the `psi_linkage` job).
            encrypt: CKKS ciphertexts (default) or plaintext vectors (comparison only).
            num_sites: federation size, to pick this site's part of the bundled demo data and to bound
                the encrypted sum.
            min_cell / max_bins_percent: suppression thresholds applied if this site releases.
            dp: None, or {"epsilon", "mechanism", "delta"} for output DP on the release.
        """
        super().__init__()
        # FedJob serialises a component from the attributes named like its __init__ arguments.
        self.spec, self.group_values = dict(spec or {}), dict(group_values or {})
        self.group_column, self.cohort, self.id_column = group_column, cohort, id_column
        self.encrypt, self.num_sites, self.min_cell = encrypt, num_sites, min_cell
        self.max_bins_percent, self.dp, self.job_label = max_bins_percent, dp, job_label
        self._spec = stats.StatsSpec.from_dict(self.spec) if self.spec else None
        self._ready = False
        self._ctx = None
        self._fingerprint = ""
        self._sent_pass1 = False

    # --- state for the whole job at this site ------------------------------------------------------------
    def _setup(self, fl_ctx: FLContext) -> None:
        if self._ready:
            return
        if self._spec is None:
            raise ValueError(f"{self.site}: job config carries no statistics spec")
        if self.cohort not in COHORTS:
            raise ValueError(f"{self.site}: unknown cohort '{self.cohort}' (known: {', '.join(COHORTS)})")
        self.root = participant_root(fl_ctx)
        self.policy = SitePolicy.load(self.root)
        self.audit = AuditLog(self.root, self.site)
        if self.policy.require_encryption and not self.encrypt:
            raise SiteRefusal(
                f"{self.site}: local privacy policy requires encrypted statistics; this job sends plaintext"
            )
        if self.encrypt:
            self._ctx, self._fingerprint = site_context(self.root, self.site)
        index = site_index(self.site)
        own_data = self.policy.data_dir is not None or getattr(self.policy, "database", None) is not None
        if not own_data and (index is None or index >= self.num_sites):
            raise SiteRefusal(f"{self.site}: no data_dir in local/resources.json and no bundled split for this name")
        x, labels, origin, columns = self._load(index or 0)
        if self.dp is not None:  # DP sums need complete rows: one noisy count then serves every feature
            keep = ~np.isnan(x).any(axis=1)
            x, labels = x[keep], [lab for lab, k in zip(labels, keep, strict=True) if k]
            columns = {c: np.asarray(v, dtype=object)[keep] for c, v in columns.items()}
        self.x, self.masks = x, group_masks(labels, self._spec, self.group_values)
        self.columns = columns
        self.digest = data_digest(x, labels)
        self.run_id = str(fl_ctx.get_job_id() or "")
        self.log_info(fl_ctx, f"{self.site}: {origin}, {len(x)} rows")
        self.audit.append("job_start", job=self.job_label, encrypted=self.encrypt, cohort=self.cohort)
        self._ready = True

    def _load(self, index: int) -> tuple[np.ndarray, list, str, dict]:
        from clinfed.analytics import psi
        from clinfed.data.sitedb import find_site_databases

        spec = self._spec
        features = list(spec.features)
        others = [*(c for c, _ in spec.proportions), *(spec.rate or ())]
        columns: dict = {}
        wanted = psi.read_intersection(self.root, self.site) if self.cohort == "intersect" else None
        dbs = find_site_databases(self.policy.data_dir) if self.policy.data_dir else {}
        if getattr(self.policy, "database", None) is not None or self.site in dbs:  # the site's database
            id_col = self.id_column if wanted is not None else None
            x, labels, ids, columns = read_cohort_db(
                self.site, self.policy, features, self.group_column, id_col, others
            )
            origin = "its database" if self.site not in dbs else f"{dbs[self.site]}"
        elif self.policy.data_dir:
            id_col = self.id_column if wanted is not None else None
            x, labels, ids, columns = read_cohort_csv(
                self.site, self.policy.data_dir, features, self.group_column, id_col, others
            )
            origin = f"{self.policy.data_dir}"
        else:
            if others:
                raise SiteDataError(f"{self.site}: the bundled data has no column '{others[0]}'")
            table = bc.load_bundled()
            if self.group_column != bc.LABEL_COLUMN:
                raise SiteDataError(f"{self.site}: the bundled data has no column '{self.group_column}'")
            if wanted is None:
                rows = bc.dirichlet_split(table.y, self.num_sites)[index]
            else:
                rows = np.asarray(psi.registry_rows(index, self.num_sites, len(table.y)))
            unknown = [f for f in features if f not in table.features]
            if unknown:
                raise SiteDataError(f"{self.site}: the bundled data has no column '{unknown[0]}'")
            cols = [table.features.index(f) for f in features]
            x, labels, ids = table.x[np.ix_(rows, cols)], table.y[rows].tolist(), psi.patient_ids(rows)
            origin = f"bundled rows, site {index + 1}/{self.num_sites}"
        if wanted is not None:
            keep = np.array([i in wanted for i in ids], dtype=bool).reshape(len(ids))
            x, labels = x[keep], [lab for lab, k in zip(labels, keep, strict=True) if k]
            columns = {c: np.asarray(v, dtype=object)[keep] for c, v in columns.items()}
            origin += f", restricted to the {int(keep.sum())} rows linked by PSI"
        return x, labels, origin, columns

    # --- vectors out and in ------------------------------------------------------------------------
    def _pack(self, vec: np.ndarray) -> dict:
        """Encrypt one packed vector as it is: it carries its own contributor slot (`stats.local_sums`),
        so `he.aggregation.weighted_encrypt`'s weighting and count layer are not needed here."""
        if not self.encrypt:
            return {STATS_KEY: vec}
        from clinfed.he.ckks import context_params, encrypt_vector
        from clinfed.he.packing import flatten, layout_to_json
        from clinfed.he.params import max_abs_value

        bound = max_abs_value(context_params(self._ctx)) / max(int(self.num_sites), 1)
        if np.abs(vec).max(initial=0.0) > bound:
            raise ValueError(
                f"{self.site}: a packed statistic exceeds the ±{bound:.4g} that {self.num_sites} sites can sum "
                "under these CKKS parameters (values far outside the public bounds?)"
            )
        layout = flatten({STATS_KEY: vec})[1]
        return payload.encrypted_params(encrypt_vector(self._ctx, vec), layout_to_json(layout), self._fingerprint)

    def _unpack(self, params: dict, size: int) -> np.ndarray:
        if payload.is_encrypted(params):
            if self._ctx is None:
                raise ValueError(f"{self.site}: received ciphertexts but this job runs without encryption")
            if params.get(payload.FINGERPRINT_KEY) != self._fingerprint:
                raise ValueError(f"{self.site}: the server's sum was made under another federation's key")
            from clinfed.he.ckks import decrypt_vector

            return decrypt_vector(self._ctx, params[payload.CKKS_KEY], size)
        if self.encrypt:
            raise ValueError(f"{self.site}: received a plaintext sum in an encrypted job")
        vec = np.asarray(params.get(STATS_KEY), dtype=np.float64).reshape(-1)
        if vec.size != size or not np.all(np.isfinite(vec)):
            raise ValueError(f"{self.site}: the server's sum has {vec.size} values (expected {size}) or NaN")
        return vec

    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if task_name not in TASKS:
            return make_reply(ReturnCode.TASK_UNKNOWN)
        self.site = fl_ctx.get_identity_name()
        round_num = TASKS.index(task_name)
        try:
            self._setup(fl_ctx)
            incoming = FLModelUtils.from_shareable(shareable)
            expected = settings_digest(self._spec, self.dp, self.cohort)
            if (incoming.meta or {}).get("settings") != expected:
                raise SiteRefusal(f"{self.site}: the server's statistics settings differ from this site's job config")
            start = time.monotonic()
            if task_name == PASS1_TASK:
                vec = stats.local_sums(self.x, self.masks, self._spec, clip=self.dp is not None, columns=self.columns)
                charged = self._charge() if self.dp is not None else 0.0
                self._sent_pass1 = True
                return self._send(self._pack(vec), round_num, start, epsilon=charged)
            if not self._sent_pass1:
                raise SiteRefusal(f"{self.site}: asked for {task_name} without having contributed to pass 1")
            params = incoming.params or {}
            if task_name == PASS2_TASK:
                sums = self._pass1_sum(params, incoming.meta or {})
                if self.dp is None:  # what an exact release of this sum would show, against the release log
                    preview = stats.release(
                        sums,
                        np.zeros((self._spec.n_groups, self._spec.n_features)),
                        self._spec,
                        min_cell=self._min_cell(incoming.meta or {}),
                        max_bins_percent=self.max_bins_percent,
                    )
                    self._admit(preview["statistics"], incoming.meta or {})
                vec = stats.local_deviations(self.x, self.masks, sums.means(), self._spec, clip=self.dp is not None)
                return self._send(self._pack(vec), round_num, start)
            return self._release(params, incoming.meta or {}, round_num, start)
        except SiteRefusal as exc:
            return self._status_reply("refused", one_line(exc, self.site), round_num)
        except Exception as exc:  # a site-level failure is reported, never allowed to stall the job
            reason = one_line(exc, self.site).splitlines()[0]
            self.log_error(fl_ctx, reason)
            return self._status_reply("failed", reason, round_num)

    # --- what every site checks and records ---------------------------------------------------------
    def _dp_config(self) -> stats.DPConfig:
        return stats.DPConfig(
            epsilon=float(self.dp["epsilon"]),
            mechanism=self.dp.get("mechanism", "laplace"),
            delta=float(self.dp.get("delta") or 0.0),
        )

    def _charge(self) -> float:
        """Reserve the release in this site's ledger before its rows go into the sum; refuse over budget.

        Returns the ε charged: a Laplace release's ε; for a Gaussian release the rise of the site's
        RDP total, which is below the release's nominal ε (basic composition of the four families).
        """
        from clinfed.privacy.ledger import BudgetExceeded, site_ledger

        dp = self._dp_config()
        ledger = site_ledger(self.root, self.site, self.policy, self.audit)
        budget = self.policy.epsilon_budget
        try:
            if dp.mechanism == "laplace":
                ledger.reserve(
                    self.job_label, 0, run=self.run_id, budget=budget, mechanism="laplace", epsilon=dp.epsilon
                )
            else:
                if dp.delta > ledger.delta:
                    raise SiteRefusal(
                        f"{self.site}: the release's δ {dp.delta:g} exceeds this site's δ {ledger.delta:g}"
                    )
                before = ledger.epsilon()
                spend = ledger.reserve(
                    self.job_label,
                    0,
                    run=self.run_id,
                    budget=budget,
                    mechanism="gaussian",
                    noise_multiplier=stats.gaussian_noise_multiplier(self._spec, dp),
                    sample_rate=1.0,
                    steps=1,
                )
                # RDP composes the four families (and earlier Gaussian spends) tighter than the release's
                # nominal ε: report what the site's total actually rose by (informational).
                return max(float(spend.epsilon_after) - before, 0.0)
        except BudgetExceeded as exc:
            raise SiteRefusal(one_line(exc, self.site)) from None
        return dp.epsilon

    def _pass1_sum(self, params: dict, meta: dict) -> stats.Sums:
        """Decrypt the pooled pass-1 sum only if it holds ≥ 3 sites' vectors, as many as the server names."""
        sums = stats.unpack_sums(self._unpack(params, self._spec.pass1_size), self._spec)
        named = list(meta.get("sites") or [])
        try:
            stats.check_contributors(sums.contributors, "pass-1 sum")
        except ValueError as exc:
            raise SiteRefusal(one_line(exc, self.site)) from None
        if sums.contributors != len(named) or self.site not in named:
            raise SiteRefusal(
                f"{self.site}: the pass-1 sum holds {sums.contributors} site vector(s) but the server names "
                f"{len(named)} site(s){'' if self.site in named else ', not including this one'}"
            )
        return sums

    def _min_cell(self, meta: dict) -> int:
        floors = [self.min_cell, _site_min_cell(self.root), meta.get("min_cell")]
        return max(int(v) for v in floors if v is not None)

    def _admit(self, statistics: dict, meta: dict) -> None:
        """Check an exact release against this site's release log and record it (see release_log's rule)."""
        definition = CohortDefinition.of(
            self.cohort, meta.get("sites") or [], self.group_column, self.group_values, self.digest
        )
        ReleaseLog(self.root, self.site).admit(
            definition, cells_of(self._spec, statistics), job=self.job_label, run=self.run_id
        )

    def _send(self, params: dict, round_num: int, start: float, epsilon: float = 0.0) -> Shareable:
        digest, size = payload.log_update(
            self.audit, "update_sent", params, job=self.job_label, round_num=round_num, site=self.site
        )
        meta = {
            "status": "ok",
            "settings": settings_digest(self._spec, self.dp, self.cohort),
            "bytes_sent": size,
            "sha256": digest,
            "metrics": {"seconds": round(time.monotonic() - start, 4)},
            "min_cell_policy": _site_min_cell(self.root),
            "epsilon": epsilon,
        }
        return FLModelUtils.to_shareable(FLModel(params=params, meta=meta, current_round=round_num))

    def _release(self, params: dict, meta: dict, round_num: int, start: float) -> Shareable:
        """Decrypt both sums, add noise, suppress: the only values that ever leave the key holders."""
        spec = self._spec
        sums = self._pass1_sum(params.get("pass1") or {}, meta)
        vec2 = self._unpack(params.get("pass2") or {}, spec.pass2_size)
        if stats.contributors(vec2, "pass-2 sum") != sums.contributors:
            raise SiteRefusal(f"{self.site}: the pass-2 sum holds another number of sites than the pass-1 sum")
        m2 = stats.unpack_deviations(vec2, spec)
        dp = self._dp_config() if self.dp is not None else None
        result = stats.release(
            sums, m2, spec, min_cell=self._min_cell(meta), dp=dp, max_bins_percent=self.max_bins_percent
        )
        if dp is None:
            self._admit(result["statistics"], meta)
        text = json.dumps(result, sort_keys=True, default=json_default)
        digest = payload_digest(text.encode())
        self.audit.append(
            "update_sent",
            job=self.job_label,
            round=round_num,
            site=self.site,
            sha256=digest,
            bytes=len(text),
            encrypted=False,
            kind="release",
        )
        meta_out = {
            "status": "ok",
            "settings": settings_digest(spec, self.dp, self.cohort),
            "bytes_sent": len(text),
            "sha256": digest,
            "metrics": {"seconds": round(time.monotonic() - start, 4)},
            "release_json": text,
            "epsilon": float(self.dp["epsilon"]) if self.dp else 0.0,
        }
        return FLModelUtils.to_shareable(FLModel(params={}, meta=meta_out, current_round=round_num))

    def _status_reply(self, status: str, reason: str, round_num: int) -> Shareable:
        if getattr(self, "audit", None) is not None:
            self.audit.append(status, job=self.job_label, round=round_num, site=self.site, reason=reason)
        meta = {"status": status, "reason": reason}
        return FLModelUtils.to_shareable(FLModel(params={}, meta=meta, current_round=round_num))


# --- server side ------------------------------------------------------------------------------------------
class CohortStatsController(ModelController):
    """Server side of `cohort_stats`: dispatch the three tasks, add what comes back, write summary.json.

    It holds only the public CKKS context (`load_server_context` refuses a secret one), never
    decrypts, and keeps no per-site plaintext when encryption is on.
    """

    def __init__(
        self,
        spec: dict | None = None,
        encrypted: bool = True,
        min_sites: int = stats.MIN_CONTRIBUTORS,
        min_cell: int = 10,
        dp: dict | None = None,
        cohort: str = "all",
        release_site: str | None = None,
        job_label: str = "cohort_stats",
        task_timeout: int = 0,
    ):
        super().__init__()
        self.spec, self.encrypted, self.min_sites, self.min_cell = dict(spec or {}), encrypted, min_sites, min_cell
        self.dp, self.cohort, self.release_site, self.job_label = dp, cohort, release_site, job_label
        self.task_timeout = task_timeout

    def _setup(self) -> None:
        self._spec = stats.StatsSpec.from_dict(self.spec)
        self.settings = settings_digest(self._spec, self.dp, self.cohort)
        self.root = participant_root(self.fl_ctx, "server")
        self.audit = AuditLog(self.root, "server")
        self.ctx, self.fingerprint = None, ""
        if self.encrypted:
            self.ctx, self.fingerprint = server_context(self.root)

    def _entry(self, site: str, meta: dict) -> dict:
        return {
            "status": meta.get("status", "failed"),
            "reason": meta.get("reason", ""),
            "metrics": meta.get("metrics", {}),
            "epsilon": float(meta.get("epsilon", 0.0) or 0.0),
            "bytes_sent": int(meta.get("bytes_sent", 0) or 0),
        }

    def _sum_pass(self, round_num: int, task: str, data: FLModel, targets: list[str], size: int) -> tuple[dict, dict]:
        """Send one pass, vet and add what comes back; (entries per site, aggregate params)."""
        results = self.send_model_and_wait(
            task_name=task, data=data, targets=targets, min_responses=len(targets), timeout=self.task_timeout
        )
        if self.encrypted:
            from clinfed.he.aggregation import EncryptedSum

            acc = EncryptedSum(self.ctx, self.fingerprint, size=size)
        else:  # plaintext comparison runs: the FedAvg baseline's sum, every site weighted 1
            from clinfed.he.aggregation import PlainWeightedSum
            from clinfed.he.packing import flatten

            acc = PlainWeightedSum(reference=flatten({STATS_KEY: np.zeros(size)})[1])
        layout = _layout_json(size)
        entries: dict[str, dict] = {}
        for result in results:
            meta = result.meta or {}
            site = meta.get("client_name", "?")
            entry = self._entry(site, meta)
            params = result.params or {}
            if entry["status"] == "ok":
                payload.log_update(
                    self.audit, "update_received", params, job=self.job_label, round_num=round_num, site=site
                )
                try:
                    self._accept(acc, site, params, meta, layout)
                    if meta.get("min_cell_policy") is not None:
                        self._policy_min_cell = max(self._policy_min_cell, int(meta["min_cell_policy"]))
                except ValueError as exc:
                    entry.update(status="failed", reason=one_line(exc, site))
            if entry["status"] != "ok":
                self.warning(entry["reason"] or f"{site}: {entry['status']}")
                self.audit.append(
                    entry["status"], job=self.job_label, round=round_num, site=site, reason=entry["reason"]
                )
            entries[site] = entry
        for site in targets:
            entries.setdefault(
                site,
                {
                    "status": "failed",
                    "reason": f"{site}: no result (timed out or died)",
                    "metrics": {},
                    "epsilon": 0.0,
                    "bytes_sent": 0,
                },
            )
        ok = sorted(s for s, e in entries.items() if e["status"] == "ok")
        if not ok:
            return entries, {}
        if self.encrypted:
            cts, _, _ = acc.result()
            agg = payload.encrypted_params(cts, layout, self.fingerprint)
        else:
            mean, weight, _ = acc.result()  # the average over sites of weight 1: times their number is the sum
            agg = {STATS_KEY: mean[STATS_KEY] * weight}
        self.audit.append("aggregation", job=self.job_label, round=round_num, sites=ok, encrypted=self.encrypted)
        return entries, agg

    def _accept(self, acc, site: str, params: dict, meta: dict, layout: str) -> None:
        if meta.get("settings") != self.settings:
            raise ValueError(f"{site}: its statistics settings differ from the job's (another spec or cohort)")
        if self.encrypted:
            if not payload.is_encrypted(params):
                raise ValueError(f"{site}: sent a plaintext vector to an encrypted job")
            if params.get(payload.LAYOUT_KEY) != layout:
                raise ValueError(f"{site}: packed layout differs from the job's")
            acc.add(site, params[payload.CKKS_KEY], 1.0, params.get(payload.FINGERPRINT_KEY, ""))
        else:
            if payload.is_encrypted(params):
                raise ValueError(f"{site}: sent ciphertexts to a plaintext job")
            acc.add(site, params, 1.0)

    def run(self) -> None:
        self._setup()
        self._policy_min_cell = 0
        targets = sorted(self.sample_clients())
        self.audit.append("job_start", job=self.job_label, encrypted=self.encrypted, cohort=self.cohort)
        rounds: list[dict] = []
        outcome = {"status": "not released", "reason": "", "release_site": None, "contributors": [], "completed": 0}
        release: dict = {}
        spec = self._spec
        try:
            meta = {"settings": self.settings}
            entries, agg1 = self._sum_pass(0, PASS1_TASK, FLModel(params={}, meta=meta), targets, spec.pass1_size)
            rounds.append({"round": 0, "pass": PASS1_TASK, "sites": entries})
            first = sorted(s for s, e in entries.items() if e["status"] == "ok")
            need = max(stats.MIN_CONTRIBUTORS, int(self.min_sites))  # a floor the job config cannot lower
            if len(first) < need:
                raise _Stop(f"only {len(first)} site(s) contributed to pass 1 (min_sites {need})")
            outcome["completed"], outcome["contributors"] = 1, first
            floor = max(self.min_cell, self._policy_min_cell)
            entries, agg2 = self._sum_pass(
                1,
                PASS2_TASK,
                FLModel(params=agg1, meta={**meta, "sites": first, "min_cell": floor}),
                first,
                spec.pass2_size,
            )
            rounds.append({"round": 1, "pass": PASS2_TASK, "sites": entries})
            second = sorted(s for s, e in entries.items() if e["status"] == "ok")
            if second != first:
                lost = sorted(set(first) - set(second))
                why = entries[lost[0]]["reason"] or entries[lost[0]]["status"]
                raise _Stop(f"{', '.join(lost)} did not contribute to pass 2 ({why}); the sums would be incomplete")
            outcome["completed"] = 2
            chosen = self.release_site if self.release_site in first else first[0]
            outcome["release_site"] = chosen
            release, entry = self._release(chosen, agg1, agg2, first, meta)
            rounds.append({"round": 2, "pass": RELEASE_TASK, "sites": {chosen: entry}})
            if entry["status"] != "ok":
                raise _Stop(f"the release site failed: {entry['reason']}")
            outcome["status"], outcome["completed"] = "released", 3
        except _Stop as stop:
            outcome["reason"] = str(stop)
            self.warning(f"cohort_stats: nothing released: {stop}")
        self.audit.append(
            "job_end", job=self.job_label, rounds_completed=outcome["completed"], outcome=outcome["status"]
        )
        self._write_summary(targets, rounds, outcome, release)

    def _release(self, site: str, agg1: dict, agg2: dict, sites: list[str], meta: dict) -> tuple[dict, dict]:
        floor = max(self.min_cell, self._policy_min_cell)
        data = FLModel(params={"pass1": agg1, "pass2": agg2}, meta={**meta, "sites": sites, "min_cell": floor})
        results = self.send_model_and_wait(
            task_name=RELEASE_TASK, data=data, targets=[site], min_responses=1, timeout=self.task_timeout
        )
        if not results:
            return {}, {
                "status": "failed",
                "reason": f"{site}: no release (timed out or died)",
                "metrics": {},
                "epsilon": 0.0,
                "bytes_sent": 0,
            }
        result_meta = results[0].meta or {}
        entry = self._entry(site, result_meta)
        if entry["status"] != "ok":
            return {}, entry
        text = result_meta.get("release_json", "")
        self.audit.append(
            "update_received",
            job=self.job_label,
            round=2,
            site=site,
            sha256=payload_digest(text.encode()),
            bytes=len(text),
            encrypted=False,
            kind="release",
        )
        try:
            release = json.loads(text)
            if not isinstance(release, dict) or not isinstance(release.get("statistics"), dict):
                raise ValueError("no statistics in it")
        except ValueError as exc:
            entry.update(status="failed", reason=f"{site}: its release is not valid JSON statistics ({exc})")
            return {}, entry
        return release, entry

    def _write_summary(self, sites: list[str], rounds: list[dict], outcome: dict, release: dict) -> None:
        sup = release.get("suppression") or {}
        statistics = release.get("statistics") or {}
        contributors = set(outcome["contributors"])
        summary = {
            "job": self.job_label,
            "sites": sites,
            "rounds_completed": outcome["completed"],
            "encrypted": self.encrypted,
            "cohort": self.cohort,
            "rounds": rounds,
            "final": {
                "status": outcome["status"],
                "reason": outcome["reason"],
                "release_site": outcome["release_site"],
                "metrics": {
                    "sites_contributing": len(contributors),
                    "groups_released": len(statistics),
                    "groups_withheld": len(sup.get("groups_withheld", {})),
                    "cells_withheld": int(sup.get("cells_withheld_total", 0)),
                },
                "per_site": {s: {"contributed": s in contributors} for s in sites},
                "primary_metric": "seconds",  # per-site metric shown by `clinfed simulate`'s table
            },
            "privacy": {
                # ε each site reserved in its own ledger for this release (0: it did not take part)
                "epsilon_charged": {s: e.get("epsilon", 0.0) for s, e in rounds[0]["sites"].items()}
                if rounds and self.dp
                else {},
            },
            "statistics": statistics,
            "suppression": sup,
            "dp": release.get("dp"),
            "precision": release.get("precision"),  # how counts, means and quantiles were rounded
        }
        path = Path(self.get_run_dir()) / SUMMARY_FILE
        path.write_text(json.dumps(summary, indent=2, default=json_default))
        self.info(f"summary written to {path}")


class _Stop(Exception):
    """The job ends without a release; the reason goes into summary.json."""


# --- the recipe -------------------------------------------------------------------------------------------
class CohortStatsRecipe(Recipe):
    """`cohort_stats` as a FLARE job: `CohortStatsController` on the server, `CohortStatsExecutor` at sites.

    Like `clinfed.fl.recipe.SecureFedAvgRecipe`, the exported job carries configuration only
    (`set_app_packages(["clinfed"])`): every argument here is JSON and ends up in the job's config.
    """

    def __init__(
        self,
        name: str,
        num_sites: int,
        spec: stats.StatsSpec,
        group_values: dict,
        group_column: str = "target",
        encrypt: bool = True,
        min_cell: int = 10,
        max_bins_percent: float | None = 10.0,
        dp: dict | None = None,
        cohort: str = "all",
        id_column: str = "patient_id",
        min_sites: int = stats.MIN_CONTRIBUTORS,
        release_site: str | None = None,
        task_timeout: int = 0,
    ):
        if num_sites < stats.MIN_CONTRIBUTORS or min_sites < stats.MIN_CONTRIBUTORS:
            raise ValueError(
                f"cohort_stats needs at least {stats.MIN_CONTRIBUTORS} sites (got {min(num_sites, min_sites)}): "
                "with two, each site could subtract its own sums from the release and read the other's"
            )
        if cohort not in COHORTS:
            raise ValueError(f"cohort must be one of {', '.join(COHORTS)}, got '{cohort}'")
        values = [str(v) for v in group_values.values()]
        if len(set(values)) != len(values):
            raise ValueError(f"two groups share a value of '{group_column}': groups must not overlap")
        missing = [g for g in spec.groups[1:] if g not in group_values]
        if missing:
            raise ValueError(f"no value of '{group_column}' given for group(s) {missing}")
        if dp is not None and spec.has_extras:  # no noise plan covers them: refuse rather than release exact
            raise ValueError(stats.EXTRAS_UNDER_DP)
        if dp is not None:  # validate here, at submission, rather than at the release site
            stats.DPConfig(
                epsilon=dp["epsilon"], mechanism=dp.get("mechanism", "laplace"), delta=dp.get("delta") or 0.0
            )
        job = FedJob(name=name, min_clients=num_sites)
        job.set_app_packages(["clinfed"])
        spec_dict = spec.to_dict()
        job.to_server(
            CohortStatsController(
                spec=spec_dict,
                encrypted=encrypt,
                min_sites=min_sites,
                min_cell=min_cell,
                dp=dp,
                cohort=cohort,
                release_site=release_site,
                job_label=name,
                task_timeout=task_timeout,
            ),
            id="controller",
        )
        job.to_clients(
            CohortStatsExecutor(
                spec=spec_dict,
                group_values=dict(group_values),
                group_column=group_column,
                cohort=cohort,
                id_column=id_column,
                encrypt=encrypt,
                num_sites=num_sites,
                min_cell=min_cell,
                max_bins_percent=max_bins_percent,
                dp=dp,
                job_label=name,
            ),
            id="executor",
            tasks=list(TASKS),
        )
        self.num_sites, self.encrypt = num_sites, encrypt
        super().__init__(job)


# --- the layout of a job on a `clinfed data split` folder ----------------------------------------------------
#: most distinct values a group or proportion column may have to count as categorical
MAX_LEVELS = 20


def _names(value: object) -> list[str]:
    """A list of column names from a list or a comma-separated string (as the CLI gives them)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(v).strip() for v in items if str(v).strip()]


def _public_levels(frame, column: str, dataset: str) -> list[str]:
    """The sorted public levels of a categorical column of the reference dataset; refuses a continuous one."""
    levels = sorted({t for t in (stats.level_text(v) for v in frame[column].tolist()) if t is not None})
    if not levels:
        raise ValueError(f"column '{column}' of {dataset} has no values")
    if len(levels) > MAX_LEVELS:
        raise ValueError(
            f"column '{column}' of {dataset} has {len(levels)} distinct values: not categorical "
            f"(at most {MAX_LEVELS} levels)"
        )
    return levels


def clinical_layout(
    manifest: dict,
    sites: int,
    features: object = None,
    group: str | None = None,
    groups: object = None,
    proportions: object = None,
    rate: object = None,
    rate_per: float | None = None,
    rate_unit: str | None = None,
    bins: int = 10,
    quantile_bins: int = 0,
) -> tuple[stats.StatsSpec, dict]:
    """(spec, group values) of a `cohort_stats` job on a split of bundled dataset ``manifest["dataset"]``.

    Everything here is public: the variables and levels come from the bundled reference dataset the
    split names, the bounds are its ranges rounded out (`stats.reference_bounds`), the person-time
    bound its largest time rounded up; no site's data is read. ``features`` default to the dataset's
    numeric covariates; ``groups`` (levels of ``group``, default all of them) as a list or
    {name: value}; ``proportions`` categorical columns; ``rate`` "EVENT:TIME" or (event, time).
    One-line ValueErrors name the unknown column or the non-numeric / non-categorical one.
    """
    from clinfed.analytics.sums_fl import check_split
    from clinfed.data.clinical import OUTCOME

    name = manifest["dataset"]
    group = None if group in (None, "", "none") else str(group)
    props = _names(proportions)
    if isinstance(rate, str):
        event, sep, time_col = rate.partition(":")
        if not sep or not event.strip() or not time_col.strip():
            raise ValueError(f"rate must be EVENT:TIME (two columns), got '{rate}'")
        rate = (event.strip(), time_col.strip())
    rate = tuple(rate) if rate else None
    if rate is not None and len(rate) != 2:
        raise ValueError(f"rate must name an event and a time column, got {list(rate)}")
    asked = _names(features)
    columns = [*asked, *([group] if group else []), *props, *(rate or ())]
    frame = check_split(manifest, sites, columns, asked, False)
    numeric = [c for c in frame.columns if frame[c].dtype.kind in "biuf"]
    names = asked or [c for c in numeric if c not in ("time", OUTCOME.get(name), group, *props, *(rate or ()))]
    if not names:
        raise ValueError(f"{name} has no numeric covariate to summarise: give features")
    bounds = stats.reference_bounds(frame[names].to_numpy(dtype=np.float64))
    if group:
        public = _public_levels(frame, group, name)
        if groups is None:
            group_values = {lv: lv for lv in public}
        elif isinstance(groups, dict):
            group_values = {str(k): stats.level_text(v) for k, v in groups.items()}
        else:
            group_values = {lv: lv for lv in _names(groups)}
        unknown = [v for v in group_values.values() if v not in public]
        if unknown:
            raise ValueError(f"'{unknown[0]}' is not a level of {group} in {name} (levels: {', '.join(public)})")
        if stats.ALL in group_values:
            raise ValueError(f"a group may not be named '{stats.ALL}'")
    else:
        group_values = {}
    rate_bound, per = 1.0, float(rate_per or 1.0)
    if rate is not None:
        event, time_col = rate
        try:
            ev = stats.numeric_column(frame[event].to_numpy(), event)
            tt = stats.numeric_column(frame[time_col].to_numpy(), time_col)
        except ValueError as exc:
            raise ValueError(f"{exc} in {name}") from None
        if not np.isin(ev[~np.isnan(ev)], (0.0, 1.0)).all():
            raise ValueError(f"event column '{event}' of {name} is not 0/1")
        if (tt[~np.isnan(tt)] < 0).any():
            raise ValueError(f"time column '{time_col}' of {name} has negative values")
        rate_bound = stats.nice_bounds(0.0, float(np.nanmax(tt)))[1]
        if not (math.isfinite(per) and per > 0):
            raise ValueError(f"rate_per must be a positive number, got {rate_per}")
    spec = stats.StatsSpec(
        features=tuple(names),
        bounds=tuple(bounds),
        groups=(stats.ALL, *group_values),
        bins=bins,
        quantile_bins=quantile_bins,
        proportions=tuple((c, tuple(_public_levels(frame, c, name))) for c in props),
        rate=rate,
        rate_bound=rate_bound,
        rate_per=per,
        rate_unit=rate_unit if rate_unit is not None else _default_unit(name, rate),
    )
    return spec, group_values


def _default_unit(dataset: str, rate: tuple[str, str] | None) -> str:
    """The bundled survival datasets keep ``time`` in days (`clinfed.data.clinical`); otherwise the column's unit."""
    if rate is None:
        return ""
    return "person-days" if rate[1] == "time" and dataset != "breast_cancer" else f"person-time in {rate[1]} units"
