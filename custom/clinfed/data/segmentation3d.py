"""3-D segmentation volumes of one site: bundled synthetic scans, or the hospital's own NIfTI folder.

The 3-D twin of `clinfed.data.segmentation`, and built the same way: every volume and mask is read
and preprocessed once, with MONAI transforms (intensity rescaled to [0, 1] per volume, resized to
the training grid S × S × S), into two in-memory tensors (N, 1, S, S, S), so the DP-SGD loop does no
I/O. Masks are binary: any label value > 0 is foreground, 0 is background.

Synthetic source (the default, nothing downloaded): MONAI's `create_test_image_3d` draws bright
spheres in a noisy cube, directly at the training size. The federation is non-IID on purpose:
profiles are interpolated from "few large spheres, clean scanner" (the first site) to "more, smaller
spheres, noisy scanner" (the last). Sizes are given for a 64³ grid and scaled with the grid, so a
site's anatomy looks the same at any resolution. Each site draws from its own seed, derived from
the job's data seed and its index, so it regenerates exactly the same volumes in every round,
process and rerun, and no two sites share a volume.

Folder source (`data_dir`): `images/` and `labels/` holding NIfTI volumes (.nii, .nii.gz), paired by
file name (`case7.nii.gz` ↔ `case7.nii`). A missing or unpaired file, an image and label of
different shapes, a 2-D file, an unreadable file or an empty folder is a one-line `SiteDataError`
naming the site and the file, raised before any training starts; `check_folder` finds the same
faults from the NIfTI headers alone, cheaply, before a job is even submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clinfed.data.segmentation import SegmentationSiteData, paired_files
from clinfed.tasks.base import SiteDataError

#: the grid the synthetic profiles' sphere radii are given for; other sizes scale them.
REFERENCE_SIZE = 64
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class VolumeProfile:
    """One site's scanner and population: sphere count, radii (voxels at 64³) and noise level."""

    num_objs: int
    rad_min: float
    rad_max: float
    noise_max: float
    blur_noise: float = 0.0  # σ of extra Gaussian noise on the final volume (the `hard` scanner)

    def scaled(self, size: int) -> tuple[int, int]:
        """(rad_min, rad_max) in voxels of a `size`³ grid; at least 2 voxels, max > min."""
        f = size / REFERENCE_SIZE
        low = max(2, round(self.rad_min * f))
        return low, max(low + 1, round(self.rad_max * f))


#: `standard`: spheres a 3-D UNet segments well at ε = 8. `hard`: small, faint, noisy lesions, where
#: even the non-private model stays below the ceiling, so the cost of DP can be seen (issue 15).
DIFFICULTIES = ("standard", "hard")


def site_profile(site_index: int, num_sites: int, difficulty: str = "standard") -> VolumeProfile:
    """The synthetic profile of site `site_index` (0-based) of `num_sites`, between two fixed extremes.

    `standard`: 3-6 spheres of radius 7-18 voxels at 64³, background noise up to 0.1-0.4 of the
    spheres' brightness. `hard`: 2-4 spheres of radius 4-8 at 64³, background noise reaching 0.65-0.85
    of the brightness, plus Gaussian noise σ 0.12-0.2 (the 2-D job's `hard` scanner, in 3-D).
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    t = site_index / (num_sites - 1) if num_sites > 1 else 0.0
    if difficulty == "hard":
        return VolumeProfile(
            num_objs=round(2 + 2 * t),
            rad_min=4,
            rad_max=round(8 - 2 * t, 2),
            noise_max=round(0.65 + 0.2 * t, 3),
            blur_noise=round(0.12 + 0.08 * t, 3),
        )
    return VolumeProfile(
        num_objs=round(3 + 3 * t),
        rad_min=round(10 - 3 * t, 2),
        rad_max=round(18 - 5 * t, 2),
        noise_max=round(0.1 + 0.3 * t, 3),
    )


def site_seed(seed: int, site_index: int) -> int:
    """The data seed of one site: the job's data seed and the site's index, never shared by two sites."""
    return (int(seed) * 1000 + int(site_index)) % (2**32)


def synthetic_volumes(profile: VolumeProfile, n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` volumes (n, S, S, S) in [0, 1] and binary masks (n, S, S, S), deterministic for a given seed."""
    from monai.data.synthetic import create_test_image_3d

    if size < 8:
        raise ValueError(f"synthetic volumes must be at least 8 voxels a side, got {size}")
    rad_min, rad_max = profile.scaled(size)
    rs = np.random.RandomState(seed)
    images = np.empty((n, size, size, size), dtype=np.float32)
    labels = np.empty((n, size, size, size), dtype=np.uint8)
    for i in range(n):
        image, label = create_test_image_3d(
            size,
            size,
            size,
            num_objs=profile.num_objs,
            rad_min=rad_min,
            rad_max=rad_max,
            noise_max=profile.noise_max,
            num_seg_classes=1,
            random_state=rs,
        )
        if profile.blur_noise:
            image = np.clip(image + rs.normal(0.0, profile.blur_noise, image.shape), 0.0, 1.0)
        images[i], labels[i] = image, label > 0
    return images, labels


class VolumeSiteData(SegmentationSiteData):
    """A site's volumes (N, 1, S, S, S) float32 in [0, 1] and binary masks of the same shape; the 2-D
    container's indexing, subsets and foreground fraction, one more spatial dimension."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str], origin: str):
        if images.shape != labels.shape or images.ndim != 5 or images.shape[1] != 1:
            raise ValueError(
                f"volumes {tuple(images.shape)} and masks {tuple(labels.shape)} must both be (N, 1, S, S, S)"
            )
        self.images, self.labels, self.names, self.origin = images, labels, names, origin

    # --- the two sources ---------------------------------------------------------------------------
    @classmethod
    def synthetic(
        cls,
        site_index: int,
        num_sites: int,
        n: int,
        image_size: int = 32,
        seed: int = 0,
        difficulty: str = "standard",
    ) -> VolumeSiteData:
        """Site `site_index`'s synthetic volumes, generated directly at `image_size`³."""
        profile = site_profile(site_index, num_sites, difficulty)
        images, labels = synthetic_volumes(profile, n, image_size, seed=site_seed(seed, site_index))
        rad_min, rad_max = profile.scaled(image_size)
        origin = (
            f"synthetic {difficulty} {image_size}³, {profile.num_objs} spheres of radius {rad_min}-{rad_max} voxels, "
            f"noise ≤ {profile.noise_max}" + (f" + σ {profile.blur_noise}" if profile.blur_noise else "")
        )
        scaled = [_rescale(img) for img in images]
        return cls(
            torch.from_numpy(np.stack(scaled))[:, None].float(),
            torch.from_numpy(labels)[:, None].float(),
            [f"synthetic-{site_index}-{i}" for i in range(n)],
            origin,
        )

    @classmethod
    def from_folder(cls, site_name: str, data_dir: str | Path, image_size: int) -> VolumeSiteData:
        """The site's own `images/` and `labels/` NIfTI volumes, paired by name, loaded with MONAI."""
        from monai.transforms import LoadImage, Resize
        from monai.utils import convert_to_tensor

        pairs = paired_volumes(site_name, data_dir)
        loader = LoadImage(image_only=True, ensure_channel_first=True)
        resize_image = Resize((image_size,) * 3, mode="area")
        resize_label = Resize((image_size,) * 3, mode="nearest")
        images, labels = [], []
        for image_path, label_path in pairs.values():
            image = _read_3d(site_name, loader, image_path, "image")
            label = _read_3d(site_name, loader, label_path, "label")
            if image.shape[1:] != label.shape[1:]:
                raise SiteDataError(
                    f"{site_name}: image {image_path.name} is {_dims(image.shape[1:])} voxels but its label "
                    f"{label_path} is {_dims(label.shape[1:])}"
                )
            image = torch.as_tensor(_rescale(image.mean(0, keepdims=True)))
            label = torch.as_tensor((label[:1] > 0).astype(np.float32))
            images.append(convert_to_tensor(resize_image(image), dtype=torch.float32, track_meta=False))
            labels.append((convert_to_tensor(resize_label(label), dtype=torch.float32, track_meta=False) > 0.5).float())
        origin = f"{len(pairs)} NIfTI image/label pairs from {Path(data_dir)} → {image_size}³"
        return cls(torch.stack(images), torch.stack(labels), list(pairs), origin)


def _rescale(volume: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] per volume (MONAI's ScaleIntensity, without the per-call overhead); flat → 0."""
    low, high = float(volume.min()), float(volume.max())
    if high <= low:
        return np.zeros_like(volume, dtype=np.float32)
    return ((volume - low) / (high - low)).astype(np.float32)


def _dims(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


def paired_volumes(site_name: str, data_dir: str | Path) -> dict[str, tuple[Path, Path]]:
    """`{name: (image path, label path)}` for every NIfTI image, refusing unpaired files in either folder
    (the 2-D task's pairing rule, `clinfed.data.segmentation.paired_files`, on NIfTI files only)."""
    return paired_files(site_name, data_dir, NIFTI_SUFFIXES, "NIfTI images")


def _header_shape(site_name: str, path: Path, kind: str) -> tuple[int, ...]:
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel's errors are multi-line or bare; the site needs the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SiteDataError(f"{site_name}: cannot read {kind} {path} ({first})") from None
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise SiteDataError(f"{site_name}: {kind} {path} has shape {shape}; this task segments 3-D volumes")
    return shape[:3]


def check_folder(site_name: str, data_dir: str | Path) -> int:
    """The number of image/label pairs in `data_dir`, after checking pairing and shapes from the NIfTI
    headers only (no voxel data is read): the faults a site would hit, found before a job is submitted."""
    pairs = paired_volumes(site_name, data_dir)
    for image_path, label_path in pairs.values():
        image, label = _header_shape(site_name, image_path, "image"), _header_shape(site_name, label_path, "label")
        if image != label:
            raise SiteDataError(
                f"{site_name}: image {image_path.name} is {_dims(image)} voxels but its label {label_path} is "
                f"{_dims(label)}"
            )
    return len(pairs)


def _read_3d(site_name: str, loader, path: Path, kind: str) -> np.ndarray:
    """A channel-first volume (C, H, W, D); a 2-D file is refused."""
    try:
        data = np.asarray(loader(str(path)), dtype=np.float32)
    except Exception as exc:  # MONAI wraps every reader's error; the site needs the file, not the stack
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SiteDataError(f"{site_name}: cannot read {kind} {path} ({first})") from None
    while data.ndim > 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 4 or min(data.shape[1:]) < 2:
        raise SiteDataError(f"{site_name}: {kind} {path} has shape {data.shape[1:]}; this task segments 3-D volumes")
    if not np.all(np.isfinite(data)):
        raise SiteDataError(f"{site_name}: {kind} {path} holds NaN or Inf values")
    return data
