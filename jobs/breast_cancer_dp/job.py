"""breast_cancer_dp: malignancy classifier on the Wisconsin breast-cancer data, DP-SGD at every site,
federated averaging under CKKS encryption.

Defaults: target ε = 3.0 per site for the whole job (δ = 1e-5, RDP accountant), clip norm 1.0,
one local epoch of batch-32 SGD per round, 5 rounds; a 30-16-1 MLP.
Run it: `clinfed simulate breast_cancer_dp --sites 3 --rounds 5 --out out/bc`.
"""

from clinfed.fl.recipe import SecureFedAvgRecipe

DEFAULTS = {
    "rounds": 5,
    "sites": 3,
    "epsilon": 3.0,  # target ε per site for this job (δ below); the site's own budget may be lower
    "delta": 1e-5,
}


def make_recipe(
    sites: int,
    rounds: int,
    encrypt: bool = True,
    epsilon: float | None = 3.0,
    straggler_wait: int = 60,
    compression: float | None = None,
    he_format: str = "compact",
    **_: object,
) -> SecureFedAvgRecipe:
    """`epsilon=None` trains without DP (the utility reference)."""
    return SecureFedAvgRecipe(
        name="breast_cancer_dp",
        task="breast_cancer",
        num_rounds=rounds,
        num_sites=sites,
        # a round needs a majority of the sites (and never fewer than 3: the recipe and the server
        # enforce that floor); the others may fail or refuse without stopping it
        min_clients=sites // 2 + 1,
        encrypt=encrypt,
        straggler_wait=straggler_wait,
        task_args={"hidden": 16},
        train_args={"local_epochs": 1, "batch_size": 32, "lr": 0.5, "optimizer": "sgd"},
        dp_args={
            "enabled": epsilon is not None,
            "target_epsilon": epsilon or 0.0,
            "delta": DEFAULTS["delta"],
            "max_grad_norm": 1.0,
        },
        primary_metric="auc",
        compression=compression,
        he_format=he_format,
    )
