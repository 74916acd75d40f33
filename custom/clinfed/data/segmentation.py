"""Segmentation scans of one site, 2-D slices or 3-D volumes: bundled synthetic scans, or the
hospital's own image/mask folder. One module for both: everything but the generator, the profiles'
numbers and the file types is the same code, parameterised by `spatial_dims`.

Both sources end in the same container (`SegmentationSiteData`, `VolumeSiteData` for 3-D): every
image and mask is read and preprocessed once (intensity rescaled to [0, 1] per image, resized to the
training grid) into two in-memory tensors (N, 1, S, S) or (N, 1, S, S, S). The sets are small, and
preprocessing once keeps the DP-SGD loop free of per-step I/O, which on two CPU cores would cost more
than the training step itself. Masks are binary: any label value > 0 is foreground, 0 is background.

Synthetic source (the default, nothing downloaded): MONAI's `create_test_image_2d` draws bright discs
on a noisy background at 128 × 128 (or more) pixels, then resized to the training size;
`create_test_image_3d` draws spheres in a noisy cube directly at the training size. The federation is
non-IID on purpose, as imaging sites are: site profiles are interpolated from "few large objects,
clean scanner" (the first site) to "many small objects, noisy scanner" (the last), so a model that
only saw one site would do worse on the others. Radii are given for a reference grid (128 px, 64³)
and scaled with the grid. Each site draws from its own seed, derived from the job's data seed and
its index, so it regenerates exactly the same data in every round, process and rerun, and no two
sites share a scan.

Folder source (`data_dir`): `images/` and `labels/` holding NIfTI (.nii, .nii.gz) or, in 2-D, PNG
files, paired by file name (`case7.nii.gz` ↔ `case7.nii`; the extension may differ). A missing or
unpaired file, an image and label of different shapes, a file of the wrong dimension, an unreadable
file or an empty folder is a one-line `SiteDataError` naming the site and the file, raised before any
training starts; `check_folder` finds the same faults from the NIfTI headers alone, cheaply, before a
3-D job is even submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.transforms import LoadImage, Resize
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from clinfed.tasks.base import SiteDataError

#: the smallest synthetic 2-D scan we generate; smaller ones make discs a few pixels wide and unrealistic.
MIN_SOURCE_SIZE = 128
#: the smallest synthetic volume side
MIN_VOLUME_SIZE = 8
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".png")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
IMAGES_FOLDER, LABELS_FOLDER = "images", "labels"
#: the grid each dimension's profile radii are given for
REFERENCE_SIZE = {2: MIN_SOURCE_SIZE, 3: 64}
#: `standard`: the easy discs/spheres every earlier measurement used (DP costs almost nothing there).
#: `hard`: small, faint, noisy lesions, where even the non-private model stays below the ceiling,
#: so the cost of DP, and what recovers it, can be seen (issue 15).
DIFFICULTIES = ("standard", "hard")


@dataclass(frozen=True)
class SyntheticProfile:
    """What one site's scanner and population look like: object count, radii (at the reference grid), noise."""

    num_objs: int
    rad_min: float
    rad_max: float
    noise_max: float
    blur_noise: float = 0.0  # σ of extra Gaussian noise on the final image (the `hard` scanner)
    reference_size: int = MIN_SOURCE_SIZE

    def scaled(self, size: int) -> tuple[int, int]:
        """(rad_min, rad_max) on a `size` grid; at least 2, max > min."""
        f = size / self.reference_size
        low = max(2, round(self.rad_min * f))
        return low, max(low + 1, round(self.rad_max * f))


VolumeProfile = SyntheticProfile  # the 3-D name, kept for readers of older code

#: (first site, last site) of each profile field, per (spatial dims, difficulty); radii at the reference grid.
_EXTREMES = {
    (2, "standard"): {"num_objs": (4, 12), "rad_min": (12, 5), "rad_max": (28, 16), "noise_max": (0.1, 0.6)},
    (2, "hard"): {
        "num_objs": (2, 5),
        "rad_min": (3, 3),
        "rad_max": (8, 6),
        "noise_max": (0.65, 0.85),
        "blur_noise": (0.12, 0.2),
    },
    (3, "standard"): {"num_objs": (3, 6), "rad_min": (10, 7), "rad_max": (18, 13), "noise_max": (0.1, 0.4)},
    (3, "hard"): {
        "num_objs": (2, 4),
        "rad_min": (4, 4),
        "rad_max": (8, 6),
        "noise_max": (0.65, 0.85),
        "blur_noise": (0.12, 0.2),
    },
}


def site_profile(
    site_index: int, num_sites: int, difficulty: str = "standard", spatial_dims: int = 2
) -> SyntheticProfile:
    """The synthetic profile of site `site_index` (0-based) of `num_sites`, between two fixed extremes.

    Interpolating (rather than drawing profiles at random) keeps the federation's heterogeneity the
    same for any number of sites and makes the first and last sites always the most different.
    2-D `hard`: 2-5 lesions of radius 3-8 px at 128 px, background noise reaching 0.65-0.85 of the
    lesions' brightness, plus Gaussian noise σ 0.12-0.2. 3-D `standard`: 3-6 spheres of radius 7-18
    voxels at 64³; 3-D `hard`: 2-4 spheres of radius 4-8, the 2-D job's `hard` scanner.
    """
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTIES)}, got {difficulty!r}")
    t = site_index / (num_sites - 1) if num_sites > 1 else 0.0
    at = {k: a + (b - a) * t for k, (a, b) in _EXTREMES[(spatial_dims, difficulty)].items()}
    radius = (lambda r: round(r)) if spatial_dims == 2 else (lambda r: round(r, 2))  # 2-D radii are whole pixels
    return SyntheticProfile(
        num_objs=round(at["num_objs"]),
        rad_min=radius(at["rad_min"]),
        rad_max=radius(at["rad_max"]),
        noise_max=round(at["noise_max"], 3),
        blur_noise=round(at.get("blur_noise", 0.0), 3),
        reference_size=REFERENCE_SIZE[spatial_dims],
    )


def site_seed(seed: int, site_index: int) -> int:
    """The data seed of one site: the job's data seed and the site's index, never shared by two sites."""
    return (int(seed) * 1000 + int(site_index)) % (2**32)


def synthetic_arrays(
    profile: SyntheticProfile, n: int, source_size: int = MIN_SOURCE_SIZE, seed: int = 0, spatial_dims: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """`n` images (n, S, S[, S]) in [0, 1] and binary masks of the same shape, deterministic for a given seed."""
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    smallest = MIN_SOURCE_SIZE if spatial_dims == 2 else MIN_VOLUME_SIZE
    if source_size < smallest:
        what = f"{smallest} px" if spatial_dims == 2 else f"{smallest} voxels a side"
        raise ValueError(f"synthetic {_UNITS[spatial_dims]} must be at least {what}, got {source_size}")
    rad_min, rad_max = profile.scaled(source_size)
    generate = create_test_image_2d if spatial_dims == 2 else create_test_image_3d
    rs = np.random.RandomState(seed)
    shape = (n, *(source_size,) * spatial_dims)
    images, labels = np.empty(shape, dtype=np.float32), np.empty(shape, dtype=np.uint8)
    for i in range(n):
        image, label = generate(
            *(source_size,) * spatial_dims,
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


_UNITS = {2: "images", 3: "volumes"}


class SegmentationSiteData(Dataset):
    """A site's images (N, 1, S, S) float32 in [0, 1] and binary masks of the same shape, as `(image, mask)` pairs."""

    spatial_dims = 2

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, names: list[str], origin: str):
        dims = self.spatial_dims
        if images.shape != labels.shape or images.ndim != 2 + dims or images.shape[1] != 1:
            layout = "(N, 1" + ", S" * dims + ")"
            raise ValueError(
                f"{_UNITS[dims]} {tuple(images.shape)} and masks {tuple(labels.shape)} must both be {layout}"
            )
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
        image_size: int | None = None,
        source_size: int | None = None,
        seed: int = 0,
        difficulty: str = "standard",
    ) -> SegmentationSiteData:
        """Site `site_index`'s synthetic scans, generated at `source_size` (2-D; volumes: at the training
        size) and resized to `image_size`."""
        dims = cls.spatial_dims
        if image_size is None:
            image_size = MIN_SOURCE_SIZE if dims == 2 else 32
        if dims == 3 or source_size is None:  # volumes are generated at the training size
            source_size = image_size if dims == 3 else MIN_SOURCE_SIZE
        profile = site_profile(site_index, num_sites, difficulty, dims)
        # One seed per site (and per federation seed): sites never share images, and reruns match.
        images, labels = synthetic_arrays(profile, n, source_size, seed=site_seed(seed, site_index), spatial_dims=dims)
        prep = Preprocess(image_size, dims)
        pairs = [prep(img[None], lab[None]) for img, lab in zip(images, labels, strict=True)]
        noise = f"noise ≤ {profile.noise_max}" + (f" + σ {profile.blur_noise}" if profile.blur_noise else "")
        if dims == 2:
            origin = (
                f"synthetic {source_size} px → {image_size} px, {profile.num_objs} discs of radius "
                f"{profile.rad_min}-{profile.rad_max}, {noise}"
            )
        else:
            rad_min, rad_max = profile.scaled(image_size)
            origin = (
                f"synthetic {difficulty} {image_size}³, {profile.num_objs} spheres of radius {rad_min}-{rad_max} "
                f"voxels, {noise}"
            )
        return cls._stack(pairs, [f"synthetic-{site_index}-{i}" for i in range(n)], origin)

    @classmethod
    def from_folder(cls, site_name: str, data_dir: str | Path, image_size: int) -> SegmentationSiteData:
        """The site's own `images/` and `labels/` (NIfTI, or PNG in 2-D; paired by name), loaded with MONAI."""
        dims = cls.spatial_dims
        pairs = paired_files(site_name, data_dir, *_FILE_TYPES[dims])
        loader = LoadImage(image_only=True, ensure_channel_first=True)
        prep = Preprocess(image_size, dims)
        tensors = []
        for image_path, label_path in pairs.values():
            image = _read(site_name, loader, image_path, "image", dims)
            label = _read(site_name, loader, label_path, "label", dims)
            if image.shape[1:] != label.shape[1:]:
                unit = "px" if dims == 2 else "voxels"
                raise SiteDataError(
                    f"{site_name}: image {image_path.name} is {_dims(image.shape[1:])} {unit} but its label "
                    f"{label_path} is {_dims(label.shape[1:])}"
                )
            tensors.append(prep(image.mean(0, keepdims=True), label[:1] > 0))
        kind = "image/label" if dims == 2 else "NIfTI image/label"
        origin = f"{len(pairs)} {kind} pairs from {Path(data_dir)}" + (f" → {image_size}³" if dims == 3 else "")
        return cls._stack(tensors, list(pairs), origin)

    @classmethod
    def _stack(cls, pairs: list[tuple[torch.Tensor, torch.Tensor]], names: list[str], origin: str):
        images = torch.stack([p[0] for p in pairs]).float()
        labels = torch.stack([p[1] for p in pairs]).float()
        return cls(images, labels, names, origin)


class VolumeSiteData(SegmentationSiteData):
    """A site's volumes (N, 1, S, S, S) float32 in [0, 1] and binary masks of the same shape."""

    spatial_dims = 3


class Preprocess:
    """Applied once per image: rescale intensity to [0, 1], resize to the training grid (if it differs).

    Masks are resized with nearest-neighbour interpolation so they stay binary; images with area
    averaging, which is the right anti-aliasing filter when shrinking.
    """

    def __init__(self, image_size: int, spatial_dims: int = 2):
        self.size = (image_size,) * spatial_dims
        self.resize_image = Resize(self.size, mode="area")
        self.resize_label = Resize(self.size, mode="nearest")

    def __call__(self, image: np.ndarray | torch.Tensor, label: np.ndarray | torch.Tensor):
        image = torch.as_tensor(_rescale(np.asarray(image, dtype=np.float32)))
        label = torch.as_tensor(np.asarray(label), dtype=torch.float32)
        if tuple(image.shape[1:]) != self.size:
            image = convert_to_tensor(self.resize_image(image), dtype=torch.float32, track_meta=False)
            label = convert_to_tensor(self.resize_label(label), dtype=torch.float32, track_meta=False)
        return image, (label > 0.5).float()


def _rescale(image: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] per image (MONAI's ScaleIntensity, without the per-call overhead); flat → 0."""
    low, high = float(image.min()), float(image.max())
    if high <= low:
        return np.zeros_like(image, dtype=np.float32)
    return ((image - low) / (high - low)).astype(np.float32)


def _dims(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


#: (file suffixes, what they are called in errors) each dimension's folder source accepts
_FILE_TYPES = {2: (IMAGE_SUFFIXES, "images"), 3: (NIFTI_SUFFIXES, "NIfTI images")}


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


def _read(site_name: str, loader: LoadImage, path: Path, kind: str, spatial_dims: int = 2) -> np.ndarray:
    """A channel-first array (C, H, W[, D]); in 2-D a NIfTI with one slice is accepted, a volume refused;
    in 3-D a 2-D file is refused."""
    try:
        data = np.asarray(loader(str(path)), dtype=np.float32)
    except Exception as exc:  # MONAI wraps every reader's error; the site needs the file, not the stack
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SiteDataError(f"{site_name}: cannot read {kind} {path} ({first})") from None
    while data.ndim > spatial_dims + 1 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != spatial_dims + 1 or (spatial_dims == 3 and min(data.shape[1:]) < 2):
        what = "2-D slices" if spatial_dims == 2 else "3-D volumes"
        raise SiteDataError(f"{site_name}: {kind} {path} has shape {data.shape[1:]}; this task segments {what}")
    if not np.all(np.isfinite(data)):
        raise SiteDataError(f"{site_name}: {kind} {path} holds NaN or Inf values")
    return data
