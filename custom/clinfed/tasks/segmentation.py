"""Lesion segmentation in 2-D slices or 3-D volumes: a small MONAI UNet trained with DP-SGD at each
site, scored by Dice. One task for both (`SegmentationTask`, and `Segmentation3DTask` with the 3-D
job's defaults): only the network's `spatial_dims`, the data container and the example figure differ.

Three choices are forced by DP-SGD rather than by taste (measured with opacus 1.6.0, monai 1.6.1):
- Normalisation is instance norm. BatchNorm mixes the samples of a batch, so a per-sample gradient
  no longer exists and Opacus refuses it; instance norm normalises each image on its own.
- No in-place activation anywhere: Opacus' backward hooks fail on a view modified in place, and its
  ModuleValidator does not catch it, so `build_model` checks for it itself.
- The loss is Dice + cross-entropy computed *per image* and then averaged (MONAI's `batch=False`,
  the default). A batch-level Dice would couple the images of a batch, and Opacus' per-sample
  clipping assumes the batch loss is the mean of independent per-sample losses. Cross-entropy
  gives a dense gradient from the first step, which matters when the signal must survive clipping
  to a small norm and Gaussian noise; Dice alone starts very flat.

The network is MONAI's `UNet` with channels (8, 16, 32): about 12 k parameters in 2-D (35 k in 3-D),
so a site trains an epoch of 128 × 128 images in seconds on two CPU cores, with DP-SGD costing about
what non-private training costs (`clinfed bench dp`). The jobs' `--channels` picks others (32, 64,
128: about 186 k in 2-D). Opacus' per-sample gradients of its convolutions, transposed convolutions
and PReLUs come from `clinfed.per_sample_grads` (exact; the unit tests compare them with one
backward pass per sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.networks.utils import one_hot
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import Dataset

from clinfed.data.segmentation import MIN_SOURCE_SIZE, SegmentationSiteData, VolumeSiteData, site_profile
from clinfed.tasks.base import SiteData, SiteDataError, Task

NUM_CLASSES = 2  # background, foreground
#: Seed of the public pretraining set: sites derive theirs from the job seed × 1000 + index, never this.
PUBLIC_SEED = 4_000_000  # × 1000 + k stays under 2**32 (RandomState)
PUBLIC_PROFILES = 5


def check_dp_compatible(model: nn.Module) -> None:
    """Raise if Opacus cannot compute exact per-sample gradients of `model`.

    Adds to `ModuleValidator` the one failure it misses: in-place activations, which only break at
    the first backward pass, deep inside a site's training round.
    """
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"model is not DP-SGD compatible: {errors[0]}")
    for name, module in model.named_modules():
        if getattr(module, "inplace", False):
            raise ValueError(f"model is not DP-SGD compatible: {name} ({type(module).__name__}) works in place")


class SegmentationTask(Task):
    primary_metric = "dice"
    #: DP-SGD may run each sampled batch this many images at a time (fixed-size activations keep glibc's
    #: heap from fragmenting under Poisson batches: `clinfed.training.hooks_backward`, `bench dp`). Off
    #: by default: with it on, the compressed 3-round test run's Dice fell to 0.25-0.54 (3 of 4 runs
    #: below the 0.6 the whole-batch path reached) and the cause is not yet found; `--physical-batch`
    #: style opt-in stays for the benchmark.
    physical_batch = 0
    #: 2 or 3: the network's and the data's spatial dimensions
    spatial_dims = 2
    #: the site-data container of that dimension
    data_class: type[SegmentationSiteData] = SegmentationSiteData

    def __init__(
        self,
        image_size: int = 128,
        source_size: int = MIN_SOURCE_SIZE,
        n_train: int = 512,
        n_test: int = 64,
        channels: Sequence[int] = (8, 16, 32),
        strides: Sequence[int] = (2, 2),
        num_res_units: int = 1,
        seed: int = 0,
        test_fraction: float = 0.2,
        eval_batch: int = 64,
        difficulty: str = "standard",
        public_pretrain: int = 0,
        public_pretrain_epochs: int = 3,
    ):
        """
        Args:
            image_size: training resolution; images are generated (or read) larger and resized to it.
            source_size: synthetic generation size (≥ 128).
            n_train / n_test: synthetic images per site for training / held-out scoring.
            channels / strides / num_res_units: the UNet; `len(channels) == len(strides) + 1`.
            seed: the federation's data seed (each site derives its own from it).
            test_fraction: share of a real folder's pairs held out (by a fixed-seed shuffle).
            eval_batch: images per forward pass when scoring, to bound memory on large test sets.
            difficulty: synthetic data, "standard" discs or "hard" small faint noisy lesions
                (`clinfed.data.segmentation.site_profile`).
            public_pretrain: images of *public* synthetic data (MONAI's generator, the fixed public seed
                `PUBLIC_SEED`, the job's difficulty) the initial model is trained on, without DP,
                before any private step: free under DP, since no patient is in it (0: off).
            public_pretrain_epochs: epochs over that public set.
        """
        if len(channels) != len(strides) + 1:
            raise ValueError(f"UNet needs one more channel entry than strides, got {list(channels)} / {list(strides)}")
        if image_size % int(np.prod(strides)):
            raise ValueError(f"image_size {image_size} must be divisible by the UNet's total stride {np.prod(strides)}")
        self.image_size, self.source_size = int(image_size), int(source_size)
        self.n_train, self.n_test, self.seed = int(n_train), int(n_test), int(seed)
        self.channels, self.strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        self.num_res_units, self.test_fraction, self.eval_batch = int(num_res_units), test_fraction, int(eval_batch)
        site_profile(0, 1, difficulty, self.spatial_dims)  # refuses an unknown difficulty when the job is built
        self.difficulty = difficulty
        self.public_pretrain, self.public_pretrain_epochs = int(public_pretrain), int(public_pretrain_epochs)
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def build_model(self) -> nn.Module:
        model = UNet(
            spatial_dims=self.spatial_dims,
            in_channels=1,
            out_channels=NUM_CLASSES,
            channels=self.channels,
            strides=self.strides,
            num_res_units=self.num_res_units,
            norm="instance",
        )
        check_dp_compatible(model)
        if self.public_pretrain > 0:
            self.pretrain_on_public_data(model)
        return model

    def pretrain_on_public_data(self, model: nn.Module) -> None:
        """Non-private training on public synthetic scans before any private step (DP-free by construction).

        Why: DP-SGD's noise costs most where the model starts far from a solution; a start that already
        knows what a lesion looks like needs few, noisy private steps. The public set mixes five scanner
        profiles of the job's difficulty, drawn from `PUBLIC_SEED` (never a site's seed), so it holds no
        patient and every site that builds the model under the job's seed builds the same one.
        """
        images, labels = self.public_data()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        model.train()
        for _ in range(self.public_pretrain_epochs):
            for idx in torch.randperm(len(images)).split(32):
                optimizer.zero_grad()
                self._loss(model(images[idx]), labels[idx]).backward()
                optimizer.step()

    # --- the site's data: what the 3-D task overrides ------------------------------------------------
    #: what one sample is called in a site's data description
    unit = "images"

    def synthetic_data(self, site_index: int, num_sites: int, n: int, seed: int) -> SegmentationSiteData:
        """`n` synthetic samples of profile `site_index` of `num_sites`, at the training size."""
        return self.data_class.synthetic(
            site_index,
            num_sites,
            n,
            image_size=self.image_size,
            source_size=self.source_size,
            seed=seed,
            difficulty=self.difficulty,
        )

    def folder_data(self, site_name: str, data_dir: str | Path) -> SegmentationSiteData:
        return self.data_class.from_folder(site_name, data_dir, self.image_size)

    def size_text(self) -> str:
        return f"{self.image_size} px" if self.spatial_dims == 2 else f"{self.image_size}³"

    def public_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`public_pretrain` public synthetic samples: five scanner profiles, the public seed."""
        per = -(-self.public_pretrain // PUBLIC_PROFILES)
        parts = [self.synthetic_data(k, PUBLIC_PROFILES, per, PUBLIC_SEED) for k in range(PUBLIC_PROFILES)]
        n = self.public_pretrain
        return torch.cat([p.images for p in parts])[:n], torch.cat([p.labels for p in parts])[:n]

    def load_site_data(self, site_name: str, site_index: int, num_sites: int, data_dir: str | Path | None) -> SiteData:
        if data_dir:
            full = self.folder_data(site_name, data_dir)
            train, test = self.hold_out(full, site_name, data_dir)
        else:
            full = self.synthetic_data(site_index, num_sites, self.n_train + self.n_test, self.seed)
            train, test = full.subset(range(self.n_train)), full.subset(range(self.n_train, len(full)))
        desc = (
            f"{full.origin}: {len(train)} train, {len(test)} test {self.unit} at {self.size_text()}, "
            f"foreground {100 * train.foreground_fraction():.1f} %"
        )
        return SiteData(train=train, test=test, description=desc)

    def hold_out(self, full, site_name: str, data_dir: str | Path):
        """(train, test) of a site's own folder: `test_fraction` of its pairs by a fixed-seed shuffle."""
        if len(full) < 2:
            raise SiteDataError(f"{site_name}: {data_dir} holds {len(full)} image/label pair; need ≥ 2 to hold one out")
        order = np.random.default_rng(self.seed).permutation(len(full))
        n_test = min(len(full) - 1, max(1, round(self.test_fraction * len(full))))
        return full.subset(np.sort(order[n_test:])), full.subset(np.sort(order[:n_test]))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self._loss(output, target)

    def per_sample_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy of each image: MONAI's per-image Dice (`reduction="none"`, averaged over
        classes) plus the pixel-mean cross-entropy; their batch mean is `loss` exactly."""
        dice = DiceLoss(to_onehot_y=True, softmax=True, reduction="none")(output, target).flatten(1).mean(1)
        ce = nn.functional.cross_entropy(output, target[:, 0].long(), reduction="none").flatten(1).mean(1)
        return self._loss.lambda_dice * dice + self._loss.lambda_ce * ce

    def predict(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, one-hot prediction) in eval mode and without gradients, restoring the model's mode."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                logits = torch.cat([model(chunk) for chunk in images.split(self.eval_batch)])
        finally:
            model.train(was_training)
        return logits, one_hot(logits.argmax(1, keepdim=True), num_classes=NUM_CLASSES)

    def per_image_dice(self, model: nn.Module, test: SegmentationSiteData) -> tuple[np.ndarray, torch.Tensor, float]:
        """Foreground Dice of each test image, the predicted masks, and the mean loss."""
        logits, pred = self.predict(model, test.images)
        truth = one_hot(test.labels, num_classes=NUM_CLASSES)
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
        dice = metric(pred, truth).reshape(-1).numpy()
        return dice, pred[:, 1:], float(self._loss(logits, test.labels))

    def evaluate(self, model: nn.Module, test: Dataset) -> dict[str, float]:
        """Mean foreground Dice over the held-out images (images with an empty mask are skipped) and loss."""
        dice, _, loss = self.per_image_dice(model, _as_site_data(test, self.data_class))
        scored = dice[np.isfinite(dice)]
        return {"dice": float(scored.mean()) if len(scored) else float("nan"), "loss": loss}

    def save_examples(self, model: nn.Module, test: Dataset, path: Path, n: int | None = None) -> Path:
        """A PNG of `n` held-out samples (2-D: 4, 3-D: 2): rows are the image, its ground truth and the
        prediction with its Dice; a 2-D image is one column, a volume three (axial, coronal and sagittal
        slices through the centre of its true foreground, the volume's centre if it has none, so the
        lesion is in every view).

        Drawn with matplotlib's object API on an Agg canvas, not pyplot: the FLARE simulator runs
        sites as threads of one process, and pyplot's global figure state is not thread-safe.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        volumes = self.spatial_dims == 3
        data = _as_site_data(test, self.data_class)
        count = min(n or (2 if volumes else 4), len(data))
        if count == 0:
            raise ValueError(f"no test {self.unit} to draw")
        shown = data.subset(range(count))
        dice, pred, _ = self.per_image_dice(model, shown)
        views = VIEWS if volumes else ("",)
        cols = len(views) * count
        fig = Figure(figsize=(2.0 * cols, 6.6) if volumes else (2.2 * count, 6.9))
        FigureCanvasAgg(fig)
        axes = fig.subplots(3, cols, squeeze=False)
        rows = (("image", shown.images), ("ground truth", shown.labels), ("prediction", pred))
        for v in range(count):
            centre = _foreground_centre(shown.labels[v, 0]) if volumes else None
            for r, (title, tensors) in enumerate(rows):
                for k, view in enumerate(views):
                    ax = axes[r][len(views) * v + k]
                    picture = _slice(tensors[v, 0], k, centre[k]) if volumes else tensors[v, 0].numpy()
                    ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if r == 0 and volumes:
                        ax.set_title(f"volume {v + 1} {view}", fontsize=8)
                    if len(views) * v + k == 0:
                        ax.set_ylabel(title)
                    if r == 2 and k == len(views) // 2:
                        ax.set_xlabel(f"Dice {dice[v]:.3f}" if np.isfinite(dice[v]) else "Dice n/a (empty mask)")
        what = "held-out volumes, orthogonal slices" if volumes else "held-out examples"
        fig.suptitle(f"{what}, mean Dice {np.nanmean(dice):.3f}")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


def _as_site_data(test: Dataset, data_class: type[SegmentationSiteData] = SegmentationSiteData) -> SegmentationSiteData:
    """Our own datasets are scored in one tensor pass; any other (image, mask) dataset is stacked first."""
    if isinstance(test, data_class):
        return test
    items = [test[i] for i in range(len(test))]  # type: ignore[arg-type]
    images = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.stack([torch.as_tensor(y, dtype=torch.float32) for _, y in items])
    return data_class(images, labels, [str(i) for i in range(len(items))], "dataset")


class Segmentation3DTask(SegmentationTask):
    """The 3-D job's task: the same loss, prediction and Dice; a 3-D network, volumes, and defaults
    for 32³ volumes (no `source_size`: volumes are generated at the training grid)."""

    spatial_dims = 3
    data_class = VolumeSiteData

    def __init__(
        self,
        image_size: int = 32,
        n_train: int = 128,
        n_test: int = 16,
        channels: Sequence[int] = (8, 16, 32),
        strides: Sequence[int] = (2, 2),
        num_res_units: int = 1,
        seed: int = 0,
        test_fraction: float = 0.2,
        eval_batch: int = 8,
        difficulty: str = "standard",
        public_pretrain: int = 0,
        public_pretrain_epochs: int = 3,
    ):
        """
        Args:
            image_size: the training grid (S × S × S voxels); synthetic volumes are generated at it,
                a site's own volumes are resized to it.
            n_train / n_test: synthetic volumes per site for training / held-out scoring.
            channels / strides / num_res_units: the UNet; `len(channels) == len(strides) + 1`.
            seed: the federation's data seed (each site derives its own from it).
            test_fraction: share of a real folder's pairs held out (by a fixed-seed shuffle).
            eval_batch: volumes per forward pass when scoring, to bound memory.
            difficulty: synthetic volumes, "standard" or "hard" (small faint noisy lesions; see
                `clinfed.data.segmentation.site_profile`).
            public_pretrain / public_pretrain_epochs: non-private pretraining on that many public
                synthetic volumes (the public seed; see the 2-D task), 0: off.
        """
        super().__init__(
            image_size=image_size,
            n_train=n_train,
            n_test=n_test,
            channels=channels,
            strides=strides,
            num_res_units=num_res_units,
            seed=seed,
            test_fraction=test_fraction,
            eval_batch=eval_batch,
            difficulty=difficulty,
            public_pretrain=public_pretrain,
            public_pretrain_epochs=public_pretrain_epochs,
        )

    unit = "volumes"


VIEWS = ("axial", "coronal", "sagittal")


def _foreground_centre(mask: torch.Tensor) -> tuple[int, int, int]:
    """Voxel index of the foreground's centre of mass (rounded), or the volume's centre if empty."""
    idx = torch.nonzero(mask > 0)
    if len(idx) == 0:
        return tuple(int(s) // 2 for s in mask.shape)  # type: ignore[return-value]
    return tuple(round(float(c)) for c in idx.float().mean(0))  # type: ignore[return-value]


def _slice(volume: torch.Tensor, axis: int, index: int) -> np.ndarray:
    """The 2-D cut of a (H, W, D) volume perpendicular to `axis` at `index`, as float numpy."""
    return volume.select(2 - axis, index).float().numpy()
