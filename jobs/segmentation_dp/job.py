"""segmentation_dp: 2-D lesion segmentation with a small MONAI UNet, DP-SGD at every site, federated
averaging under CKKS encryption.

Defaults: target ε = 8.0 per site for the whole job (δ = 1e-5, RDP accountant), clip norm 0.1,
one local epoch of batch-32 Adam (lr 0.03) per round, 5 rounds; 512 train + 64 held-out synthetic
128 × 128 images per site (non-IID: disc count, size and noise differ by site), trained at 128 px.
Small clip and Adam are what keep utility at ε = 8: clipping to 0.1 keeps most per-sample gradients
near their own direction, and Adam's per-coordinate scaling makes the step size insensitive to it.
Run it: `clinfed simulate segmentation_dp --sites 3 --out out/seg`.
`--channels A,B,C` (default 8,16,32): a wider or deeper UNet, strides 2 between levels; the image
size must be divisible by 2 ** (levels - 1). Recorded in summary.json.
"""

from clinfed.fl.recipe import SecureFedAvgRecipe, unet_layout

DEFAULTS = {
    "rounds": 5,
    "sites": 3,
    "epsilon": 8.0,  # target ε per site for this job (δ below); the site's own budget may be lower
    "delta": 1e-5,
}


def make_recipe(
    sites: int,
    rounds: int,
    encrypt: bool = True,
    epsilon: float | None = 8.0,
    image_size: int = 128,
    n_train: int | None = None,
    n_test: int = 64,
    local_epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.03,
    max_grad_norm: float = 0.1,
    difficulty: str = "standard",
    public_pretrain: int = 0,
    compression: float | None = None,
    he_format: str = "compact",
    channels: list[int] | tuple[int, ...] = (8, 16, 32),
    strides: list[int] | None = None,
    seed: int = 0,
    clip_norm: float | None = None,
    **_: object,
) -> SecureFedAvgRecipe:
    """`epsilon=None` trains without DP (the utility reference); the other arguments shrink it for tests.

    `difficulty="hard"`: small, faint, noisy lesions and 128 training images per site (512 standard).
    `seed` (`--seed`): the sites' synthetic data and the initial weights. `clip_norm` (`--clip`): DP-SGD's
    per-sample clip norm (instead of `max_grad_norm`), or without DP the batch gradient's norm.
    """
    if n_train is None:
        n_train = 128 if difficulty == "hard" else 512
    channels, strides = unet_layout("segmentation_dp", channels, image_size, strides)
    return SecureFedAvgRecipe(
        name="segmentation_dp",
        task="segmentation",
        num_rounds=rounds,
        num_sites=sites,
        encrypt=encrypt,
        task_args={
            "image_size": image_size,
            "n_train": n_train,
            "n_test": n_test,
            "channels": channels,
            "strides": strides,
            "difficulty": difficulty,
            "public_pretrain": public_pretrain,
            "seed": seed,
        },
        train_args={
            "local_epochs": local_epochs,
            "batch_size": batch_size,
            "lr": lr,
            "optimizer": "adam",
            "seed": seed,
            "clip_norm": clip_norm if epsilon is None else None,
        },
        dp_args={
            "enabled": epsilon is not None,
            "target_epsilon": epsilon or 0.0,
            "delta": DEFAULTS["delta"],
            "max_grad_norm": clip_norm if clip_norm is not None and epsilon is not None else max_grad_norm,
            "grad_sample_mode": "auto",
        },
        primary_metric="dice",
        extra_summary={
            "difficulty": difficulty,
            "public_pretrain": public_pretrain,
            "channels": channels,
            "seed": seed,
            "lr": lr,
            "local_epochs": local_epochs,
            "clip": clip_norm if clip_norm is not None else (max_grad_norm if epsilon is not None else None),
        },
        compression=compression,
        he_format=he_format,
    )
