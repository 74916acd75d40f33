"""A FLARE Recipe for clinfed's training jobs: SecureFedAvg on the server, DPTrainExecutor at the sites.

Like FLARE's own `FedAvgRecipe` it only composes components with a few arguments, so a job file
(`jobs/<name>/job.py`) reads on one screen. Unlike it, the exported job carries no code:
`clinfed` is installed at every site (`set_app_packages`), so no custom code travels with a job and
the sites' class allow-list only needs to admit `clinfed.`.
"""

from __future__ import annotations

import secrets

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from clinfed.argtypes import HE_FORMATS
from clinfed.fl.controller import SecureFedAvg
from clinfed.fl.executor import SITE_TASKS, DPTrainExecutor
from clinfed.he.aggregation import MIN_CONTRIBUTORS


class SecureFedAvgRecipe(Recipe):
    def __init__(
        self,
        name: str,
        task: str,
        num_rounds: int,
        num_sites: int,
        min_clients: int | None = None,
        encrypt: bool = True,
        task_args: dict | None = None,
        train_args: dict | None = None,
        dp_args: dict | None = None,
        primary_metric: str = "auc",
        task_timeout: int = 0,
        straggler_wait: int = 60,
        extra_summary: dict | None = None,
        compression: float | None = None,
        he_format: str = "compact",
        value_bound: float = 16.0,
    ):
        """Each recipe is one *submission*: it draws a random `submission` id that the server keys its
        resume point by, so only a resubmission of this very job folder (after a server restart) resumes
        it; a new export of the same job starts at round 0 with a fresh run key.

        There is no fault-injection argument: faults are a simulator-only switch (`clinfed.fl.faults`).
        `compression` F in (0, 1] sends only F of each update's coordinates (`clinfed.fl.compression`).
        `he_format` "compact" (default) sends dense encrypted updates as integers on a grid tied to the
        sites' DP noise (each site's change from the global model, `CompactSpec.for_noise`, ~1.9 B/param
        for large models; the fixed grid when a site trains without DP noise); "compact-fixed" on the
        fixed grid of `value_bound` / 2^20 (`clinfed.he.compact`, ~3.75 B/param); "real" as CKKS reals
        (16 B/param)."""
        _validate(name, task, num_rounds, num_sites, min_clients, dp_args or {})
        _validate_compression(name, compression)
        if he_format not in HE_FORMATS:
            raise ValueError(f"{name}: he_format must be one of {', '.join(HE_FORMATS)}, got {he_format!r}")
        if not (isinstance(value_bound, int | float) and 0 < value_bound < float("inf")):
            raise ValueError(f"{name}: value_bound must be a positive number, got {value_bound!r}")
        min_clients = max(min_clients or num_sites, MIN_CONTRIBUTORS)  # the controller enforces it again
        job = FedJob(name=name, min_clients=min_clients)
        job.set_app_packages(["clinfed"])
        train_args = {**(train_args or {}), "rounds": num_rounds}
        controller = SecureFedAvg(
            num_rounds=num_rounds,
            min_clients=min_clients,
            encrypted=encrypt,
            job_label=name,
            primary_metric=primary_metric,
            task_timeout=task_timeout,
            straggler_wait=straggler_wait,
            submission=secrets.token_hex(8),
            extra_summary=extra_summary,
            compression=compression or 0.0,
            he_format=he_format,
            value_bound=float(value_bound),
        )
        job.to_server(controller, id="controller")
        executor = DPTrainExecutor(
            task=task,
            task_args=task_args or {},
            train_args=train_args,
            dp_args=dp_args or {},
            encrypt=encrypt,
            num_sites=num_sites,
            job_label=name,
            compression=compression or 0.0,
        )
        job.to_clients(executor, id="executor", tasks=list(SITE_TASKS))
        self.num_sites, self.encrypt = num_sites, encrypt
        #: the sites' executor as configured (task, task_args, train_args, dp_args): `clinfed bench
        #: baselines` trains with exactly the job's settings without going through FLARE
        self.executor = executor
        super().__init__(job)


def _validate(name: str, task: str, num_rounds: int, num_sites: int, min_clients: int | None, dp_args: dict) -> None:
    """Refuse a bad job before it is exported or submitted: one line naming the job and the setting."""
    from clinfed.tasks import TASKS
    from clinfed.textio import safe_job_label

    safe_job_label(name)
    if task not in TASKS:
        raise ValueError(f"{name}: unknown task/model '{task}' (known: {', '.join(sorted(TASKS))})")
    if not isinstance(num_rounds, int) or num_rounds < 1:
        raise ValueError(f"{name}: rounds must be a positive integer, got {num_rounds!r}")
    if not isinstance(num_sites, int) or num_sites < MIN_CONTRIBUTORS:
        raise ValueError(
            f"{name}: needs at least {MIN_CONTRIBUTORS} sites (in a sum of two, each site can subtract its own "
            f"update and read the other's), got {num_sites!r}"
        )
    if min_clients is not None and not 1 <= min_clients <= num_sites:
        raise ValueError(f"{name}: min_clients must be between 1 and {num_sites}, got {min_clients!r}")
    if dp_args.get("enabled", True):
        eps, delta = dp_args.get("target_epsilon", 1.0), dp_args.get("delta", 1e-5)
        if not (isinstance(eps, int | float) and eps > 0):
            raise ValueError(f"{name}: target ε must be a positive number, got {eps!r}")
        if not (isinstance(delta, int | float) and 0 < delta < 1):
            raise ValueError(f"{name}: δ must be in (0, 1), got {delta!r}")
        if dp_args.get("max_grad_norm", 1.0) <= 0:
            raise ValueError(f"{name}: max_grad_norm must be positive")


def _validate_compression(name: str, compression: float | None) -> None:
    if compression is None:
        return
    ok = isinstance(compression, int | float) and not isinstance(compression, bool)
    if not (ok and 0 < compression <= 1):
        raise ValueError(
            f"{name}: compression must be a fraction in (0, 1] (0.01 sends 1 % of each update), got {compression!r}"
        )


def unet_layout(name: str, channels, image_size: int, strides=None) -> tuple[list[int], list[int]]:
    """The imaging jobs' UNet (`--channels A,B,C`): channels per level and strides between levels.

    Strides default to 2 between consecutive levels; a given list must have one entry fewer than
    `channels`, and `image_size` must be divisible by their product. Refused here, in one line
    naming the job, before the job is exported or any site starts."""
    channels = list(channels)
    if len(channels) < 2 or not all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels):
        raise ValueError(f"{name}: channels must be at least 2 positive integers (e.g. 32,64,128), got {channels!r}")
    strides = [2] * (len(channels) - 1) if strides is None else list(strides)
    if len(strides) != len(channels) - 1 or not all(isinstance(s, int) and s > 0 for s in strides):
        raise ValueError(
            f"{name}: the UNet needs one positive stride fewer than channels, "
            f"got channels {channels} / strides {strides}"
        )
    total = 1
    for s in strides:
        total *= s
    if image_size % total:
        raise ValueError(
            f"{name}: image size {image_size} is not divisible by the UNet's total stride {total} "
            f"({len(channels)} channel levels); use fewer levels"
        )
    return channels, strides
