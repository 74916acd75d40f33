"""A FLARE Recipe for clinfed's training jobs: SecureFedAvg on the server, DPTrainExecutor at the sites.

Like FLARE's own `FedAvgRecipe` it only composes components with a few arguments, so a job file
(`jobs/<name>/job.py`) reads on one screen. Unlike it, the exported job carries no code:
`clinfed` is installed at every site (`set_app_packages`), so no custom code travels with a job and
the sites' class allow-list only needs to admit `clinfed.`.
"""

from __future__ import annotations

from nvflare.job_config.api import FedJob
from nvflare.recipe.spec import Recipe

from clinfed.fl.controller import SecureFedAvg
from clinfed.fl.executor import TRAIN_TASK, VALIDATE_TASK, DPTrainExecutor


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
        inject: dict | None = None,
    ):
        min_clients = min_clients or num_sites
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
            inject=inject or {},
        )
        job.to_clients(executor, id="executor", tasks=[TRAIN_TASK, VALIDATE_TASK])
        self.num_sites, self.encrypt = num_sites, encrypt
        super().__init__(job)
