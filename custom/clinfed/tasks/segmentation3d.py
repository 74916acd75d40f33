"""3-D lesion segmentation: a small MONAI 3-D UNet trained with DP-SGD at each site, scored by Dice.

The 3-D twin of `clinfed.tasks.segmentation`, under the same three DP-SGD constraints (see there):
instance norm (each volume normalised on its own, so per-sample gradients exist), no in-place
activation (checked by `check_dp_compatible`), and Dice + cross-entropy computed per volume and then
averaged, so the batch loss is the mean of independent per-sample losses.

The network is MONAI's `UNet` with `spatial_dims=3` and channels (8, 16, 32): about 35 k parameters
(the job's `--channels` picks others).
Opacus' "hooks" mode has hooks for `Conv3d` and `InstanceNorm3d`; the PReLU and the transposed 3-D
convolutions fall back to functorch, and the per-sample gradients are exact (the unit tests compare
them with one backward pass per volume).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from torch import nn
from torch.utils.data import Dataset

from clinfed.data.segmentation3d import VolumeSiteData, site_profile
from clinfed.tasks.segmentation import (
    NUM_CLASSES,
    SegmentationTask,
    check_dp_compatible,
)

VIEWS = ("axial", "coronal", "sagittal")


class Segmentation3DTask(SegmentationTask):
    """Same loss, prediction and Dice as the 2-D task; 3-D network, volumes and report."""

    primary_metric = "dice"

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
                `clinfed.data.segmentation3d.site_profile`).
            public_pretrain / public_pretrain_epochs: non-private pretraining on that many public
                synthetic volumes (the public seed; see the 2-D task), 0: off.
        """
        # Set here rather than by the 2-D constructor, whose options (source size, public pretraining)
        # do not apply to volumes; the inherited loss, prediction and Dice only use what is set below.
        if len(channels) != len(strides) + 1:
            raise ValueError(f"UNet needs one more channel entry than strides, got {list(channels)} / {list(strides)}")
        if image_size % int(np.prod(strides)):
            raise ValueError(f"image_size {image_size} must be divisible by the UNet's total stride {np.prod(strides)}")
        site_profile(0, 1, difficulty)  # refuses an unknown difficulty when the job is built
        self.image_size, self.difficulty = int(image_size), difficulty
        self.n_train, self.n_test, self.seed = int(n_train), int(n_test), int(seed)
        self.channels, self.strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        self.num_res_units, self.test_fraction, self.eval_batch = int(num_res_units), test_fraction, int(eval_batch)
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True)
        self.public_pretrain, self.public_pretrain_epochs = int(public_pretrain), int(public_pretrain_epochs)

    def build_model(self) -> nn.Module:
        model = UNet(
            spatial_dims=3,
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

    unit = "volumes"

    def synthetic_data(self, site_index: int, num_sites: int, n: int, seed: int) -> VolumeSiteData:
        """`n` synthetic volumes of profile `site_index`, generated directly at the training grid."""
        return VolumeSiteData.synthetic(
            site_index, num_sites, n, image_size=self.image_size, seed=seed, difficulty=self.difficulty
        )

    def folder_data(self, site_name: str, data_dir: str | Path) -> VolumeSiteData:
        return VolumeSiteData.from_folder(site_name, data_dir, self.image_size)

    def size_text(self) -> str:
        return f"{self.image_size}³"

    def evaluate(self, model: nn.Module, test: Dataset) -> dict[str, float]:
        """Mean foreground Dice over the held-out volumes (volumes with an empty mask are skipped) and loss."""
        dice, _, loss = self.per_image_dice(model, _as_volume_data(test))
        scored = dice[np.isfinite(dice)]
        return {"dice": float(scored.mean()) if len(scored) else float("nan"), "loss": loss}

    def save_examples(self, model: nn.Module, test: Dataset, path: Path, n: int = 2) -> Path:
        """A PNG of orthogonal slices (axial, coronal, sagittal) through `n` held-out volumes: rows are
        the image, its ground truth and the prediction; each volume is cut through the centre of its
        true foreground (the volume's centre if it has none), so the lesion is in every view.

        Drawn with matplotlib's object API on an Agg canvas: the simulator's sites are threads of one
        process, and pyplot's global state is not thread-safe.
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        data = _as_volume_data(test)
        count = min(n, len(data))
        if count == 0:
            raise ValueError("no test volumes to draw")
        shown = data.subset(range(count))
        dice, pred, _ = self.per_image_dice(model, shown)
        cols = 3 * count
        fig = Figure(figsize=(2.0 * cols, 6.6))
        FigureCanvasAgg(fig)
        axes = fig.subplots(3, cols, squeeze=False)
        rows = (("image", shown.images), ("ground truth", shown.labels), ("prediction", pred))
        for v in range(count):
            centre = _foreground_centre(shown.labels[v, 0])
            for r, (title, tensors) in enumerate(rows):
                for k, view in enumerate(VIEWS):
                    ax = axes[r][3 * v + k]
                    ax.imshow(_slice(tensors[v, 0], k, centre[k]), cmap="gray", vmin=0.0, vmax=1.0)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    if r == 0:
                        ax.set_title(f"volume {v + 1} {view}", fontsize=8)
                    if 3 * v + k == 0:
                        ax.set_ylabel(title)
                    if r == 2 and k == 1:
                        score = f"Dice {dice[v]:.3f}" if np.isfinite(dice[v]) else "Dice n/a (empty mask)"
                        ax.set_xlabel(score)
        fig.suptitle(f"held-out volumes, orthogonal slices, mean Dice {np.nanmean(dice):.3f}")
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path


def _foreground_centre(mask: torch.Tensor) -> tuple[int, int, int]:
    """Voxel index of the foreground's centre of mass (rounded), or the volume's centre if empty."""
    idx = torch.nonzero(mask > 0)
    if len(idx) == 0:
        return tuple(int(s) // 2 for s in mask.shape)  # type: ignore[return-value]
    return tuple(round(float(c)) for c in idx.float().mean(0))  # type: ignore[return-value]


def _slice(volume: torch.Tensor, axis: int, index: int) -> np.ndarray:
    """The 2-D cut of a (H, W, D) volume perpendicular to `axis` at `index`, as float numpy."""
    return volume.select(2 - axis, index).float().numpy()


def _as_volume_data(test: Dataset) -> VolumeSiteData:
    """Our own datasets are scored in one tensor pass; any other (volume, mask) dataset is stacked first."""
    if isinstance(test, VolumeSiteData):
        return test
    items = [test[i] for i in range(len(test))]  # type: ignore[arg-type]
    images = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    labels = torch.stack([torch.as_tensor(y, dtype=torch.float32) for _, y in items])
    return VolumeSiteData(images, labels, [str(i) for i in range(len(items))], "dataset")
