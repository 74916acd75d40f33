"""2-D segmentation images of one site: bundled synthetic scans, or the hospital's own image/mask folder.

Both sources end in the same `SegmentationSiteData`: every image and mask is read and preprocessed
once, with MONAI transforms (intensity rescaled to [0, 1] per image, resized to the training
resolution), into two in-memory tensors. The sets are small (hundreds of 2-D slices), and
preprocessing once keeps the DP-SGD loop free of per-step I/O, which on two CPU cores would cost
more than the training step itself. Masks are binary: any label value > 0 is foreground (the lesion
or organ), 0 is background.

Synthetic source (the default, nothing downloaded): MONAI's `create_test_image_2d` draws bright
discs on a noisy background at 128 × 128 (or more) pixels. The federation is non-IID on purpose,
as imaging sites are: site profiles are interpolated from "few large discs, clean scanner" (the
first site) to "many small discs, noisy scanner" (the last), so a model that only saw one site
would do worse on the others. Each site's images come from its own fixed seed, so a site
regenerates exactly the same data in every round, job and process without caching anything.

Folder source (`data_dir`): `images/` and `labels/` holding NIfTI (.nii, .nii.gz) or PNG files,
paired by file name (`case7.nii.gz` ↔ `case7.nii.gz`; the extension may differ). Anything missing or
unpaired is a `SiteDataError` naming the site and the path, raised before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data.synthetic import create_test_image_2d
from monai.transforms import LoadImage, Resize, ScaleIntensity
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from clinfed.tasks.base import SiteDataError

#: the smallest synthetic scan we generate; smaller ones make discs a few pixels wide and unrealistic.
MIN_SOURCE_SIZE = 128
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png")
IMAGES_FOLDER, LABELS_FOLDER = "images", "labels"


@dataclass(frozen=True)
class SyntheticProfile:
    """What one site's scanner and population look like: disc count, disc radii (pixels at 128 px), noise."""

    num_objs: int
    rad_min: int
    rad_max: int
    noise_max: float
    blur_noise: float = 0.0  # σ of extra Gaussian noise on the final image (the `hard` scanner)


#: `standard`: the easy discs every earlier measurement used (DP costs almost nothing there).
#: `hard`: small, faint, noisy lesions, where even the non-private model stays below the ceiling,
#: so the cost of DP, and what recovers it, can be seen (issue 15).
DIFFICULTIES = ("standard", "hard")


def site_profile(site_index: int, num_sites: int, difficulty: str = "standard") -> SyntheticProfile:
    """The synthetic profile of site `site_index` (0-based) of `num_sites`, between two fixed extremes.

    Interpolating (rather than drawing profiles at random) keeps the federation's heterogeneity the
    same for any number of sites and makes the first and last sites always the most different.
    `hard`: 2-5 lesions of radius 3-8 px at 128 px, background noise reaching 0.65-0.85 of the
    lesions' brightness, plus Gaussian noise σ 0.12-0.2.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    t = site_index / (num_sites - 1) if num_sites > 1 else 0.0
    if difficulty == "hard":
        return SyntheticProfile(
            num_objs=round(2 + 3 * t),
            rad_min=3,
            rad_max=round(8 - 2 * t),
            noise_max=round(0.65 + 0.2 * t, 3),
            blur_noise=round(0.12 + 0.08 * t, 3),
        )
    return SyntheticProfile(
        num_objs=round(4 + 8 * t),
        rad_min=round(12 - 7 * t),
        rad_max=round(28 - 12 * t),
        noise_max=round(0.1 + 0.5 * t, 3),
    )


def synthetic_arrays(
    profile: SyntheticProfile, n: int, source_size: int = MIN_SOURCE_SIZE, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, H, W) in [0, 1] and binary masks (n, H, W), deterministic for a given seed."""
    if source_size < MIN_SOURCE_SIZE:
        raise ValueError(f"synthetic images must be at least {MIN_SOURCE_SIZE} px, got {source_size}")
    scale = source_size / MIN_SOURCE_SIZE
    rs = np.random.RandomState(seed)
    images = np.empty((n, source_size, source_size), dtype=np.float32)
    labels = np.empty((n, source_size, source_size), dtype=np.uint8)
    for i in range(n):
        image, label = create_test_image_2d(
            source_size,
            source_size,
            num_objs=profile.num_objs,
            rad_min=max(1, round(profile.rad_min * scale)),
            rad_max=round(profile.rad_max * scale),
            noise_max=profile.noise_max,
            num_seg_classes=1,
            random_state=rs,
        )
        if profile.blur_noise:
            image = np.clip(image + rs.normal(0.0, profile.blur_noise, image.shape), 0.0, 1.0)
        images[i], labels[i] = image, label > 0
    return images, labels


class SegmentationSiteData(Dataset):
    """A site's images (N, 1, S, S) float32 in [0, 1] and binary masks (N, 1, S, S), as `(image, mask)` pairs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str], origin: str):
        if images.shape != labels.shape or images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images {tuple(images.shape)} and masks {tuple(labels.shape)} must both be (N, 1, S, S)")
        self.images, self.labels, self.names, self.origin = images, labels, names, origin

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, indices: list[int] | np.ndarray) -> SegmentationSiteData:
        idx = [int(i) for i in indices]
        return type(self)(self.images[idx], self.labels[idx], [self.names[i] for i in idx], self.origin)

    def foreground_fraction(self) -> float:
        """Share of foreground pixels: a quick check that a site's masks are not empty or inverted."""
        return float(self.labels.mean()) if len(self) else float("nan")

    # --- the two sources ---------------------------------------------------------------------------
    @classmethod
    def synthetic(
        cls,
        site_index: int,
        num_sites: int,
        n: int,
        image_size: int = MIN_SOURCE_SIZE,
        source_size: int = MIN_SOURCE_SIZE,
        seed: int = 0,
        difficulty: str = "standard",
    ) -> SegmentationSiteData:
        """Site `site_index`'s synthetic scans, generated at `source_size` and resized to `image_size`."""
        profile = site_profile(site_index, num_sites, difficulty)
        # One seed per site (and per federation seed): sites never share images, and reruns match.
        images, labels = synthetic_arrays(profile, n, source_size, seed=seed * 1000 + site_index)
        prep = Preprocess(image_size)
        pairs = [prep(img[None], lab[None]) for img, lab in zip(images, labels, strict=True)]
        origin = (
            f"synthetic {source_size} px → {image_size} px, {profile.num_objs} discs of radius "
            f"{profile.rad_min}-{profile.rad_max}, noise ≤ {profile.noise_max}"
            + (f" + σ {profile.blur_noise}" if profile.blur_noise else "")
        )
        return cls._stack(pairs, [f"synthetic-{site_index}-{i}" for i in range(n)], origin)

    @classmethod
    def from_folder(cls, site_name: str, data_dir: str | Path, image_size: int) -> SegmentationSiteData:
        """The site's own `images/` and `labels/` (NIfTI or PNG, paired by name), loaded with MONAI."""
        pairs = paired_files(site_name, data_dir)
        loader = LoadImage(image_only=True, ensure_channel_first=True)
        prep = Preprocess(image_size)
        tensors = []
        for image_path, label_path in pairs.values():
            image = _read_2d(site_name, loader, image_path, "image")
            label = _read_2d(site_name, loader, label_path, "label")
            if image.shape[1:] != label.shape[1:]:
                raise SiteDataError(
                    f"{site_name}: image {image_path.name} is {tuple(image.shape[1:])} px but its label "
                    f"{label_path} is {tuple(label.shape[1:])} px"
                )
            tensors.append(prep(image.mean(0, keepdims=True), label[:1] > 0))
        return cls._stack(tensors, list(pairs), f"{len(pairs)} image/label pairs from {Path(data_dir)}")

    @classmethod
    def _stack(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]], names: list[str], origin: str):
        images = torch.stack([p[0] for p in pairs]).float()
        labels = torch.stack([p[1] for p in pairs]).float()
        return cls(images, labels, names, origin)


class Preprocess:
    """MONAI transforms applied once per image: rescale intensity to [0, 1], resize to the training size.

    Masks are resized with nearest-neighbour interpolation so they stay binary; images with area
    averaging, which is the right anti-aliasing filter when shrinking.
    """

    def __init__(self, image_size: int):
        self.image_size = image_size
        self.scale = ScaleIntensity(minv=0.0, maxv=1.0)
        self.resize_image = Resize((image_size, image_size), mode="area")
        self.resize_label = Resize((image_size, image_size), mode="nearest")

    def __call__(self, image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor):
        image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
        label = torch.as_tensor(np.asarray(label), dtype=torch.float32)
        image = convert_to_tensor(self.resize_image(self.scale(image)), dtype=torch.float32, track_meta=False)
        label = convert_to_tensor(self.resize_label(label), dtype=torch.float32, track_meta=False)
        return image, (label > 0.5).float()


def _stem(path: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> str | None:
    """The pairing key of an image file: its name without a known image suffix (None if not an image)."""
    lower = path.name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix) and len(lower) > len(suffix):
            return path.name[: -len(suffix)]
    return None


def _index(site_name: str, folder: Path, kind: str, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> dict[str, Path]:
    if not folder.is_dir():
        raise SiteDataError(f"{site_name}: {kind}s folder {folder} does not exist")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _stem(path, suffixes) if path.is_file() and not path.name.startswith(".") else None
        if stem is None:
            continue
        if stem in found:
            raise SiteDataError(
                f"{site_name}: {kind}s {found[stem].name} and {path.name} in {folder} have the same name"
            )
        found[stem] = path
    return found


def paired_files(
    site_name: str, data_dir: str | Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES, what: str = "images"
) -> dict[str, tuple[Path, Path]]:
    """`{name: (image path, label path)}` for every image, refusing unpaired files in either folder.

    `suffixes` are the file types taken (the 3-D task: NIfTI only); `what` names them in errors."""
    root = Path(data_dir)
    if not root.is_dir():
        raise SiteDataError(f"{site_name}: data folder {root} does not exist")
    images = _index(site_name, root / IMAGES_FOLDER, "image", suffixes)
    labels = _index(site_name, root / LABELS_FOLDER, "label", suffixes)
    if not images:
        raise SiteDataError(f"{site_name}: no {what} ({', '.join(suffixes)}) in {root / IMAGES_FOLDER}")
    for stem, path in images.items():
        if stem not in labels:
            raise SiteDataError(f"{site_name}: image {path.name} has no matching label in {root / LABELS_FOLDER}")
    for stem, path in labels.items():
        if stem not in images:
            raise SiteDataError(f"{site_name}: label {path.name} has no matching image in {root / IMAGES_FOLDER}")
    return {stem: (images[stem], labels[stem]) for stem in sorted(images)}


def _read_2d(site_name: str, loader: LoadImage, path: Path, kind: str) -> np.ndarray:
    """A channel-first 2-D array (C, H, W); a NIfTI with one slice is accepted, a volume is refused."""
    try:
        data = np.asarray(loader(str(path)), dtype=np.float32)
    except Exception as exc:  # MONAI wraps every reader's error; the site needs the file, not the stack
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SiteDataError(f"{site_name}: cannot read {kind} {path} ({first})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SiteDataError(f"{site_name}: {kind} {path} has shape {data.shape[1:]}; this task segments 2-D slices")
    if not np.all(np.isfinite(data)):
        raise SiteDataError(f"{site_name}: {kind} {path} holds NaN or Inf values")
    return data
