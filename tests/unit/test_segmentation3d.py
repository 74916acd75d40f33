"""Claims about the 3-D segmentation task: exact per-sample gradients of the 3-D UNet under Opacus,
what a site's NIfTI folder may hold (and the one-line errors when it does not), the non-IID synthetic
volumes, and the orthogonal-slice report."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from clinfed.cli import main as cli_main
from clinfed.data.segmentation import VolumeSiteData, check_folder, paired_volumes, site_profile
from clinfed.jobs import load_job
from clinfed.tasks import build_task
from clinfed.tasks.base import SiteDataError
from clinfed.tasks.segmentation import Segmentation3DTask


def cube_case(size: int, corner: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy volume with one bright cube, and its mask."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 40, (size, size, size)).astype(np.float32)
    mask = np.zeros((size, size, size), dtype=np.float32)
    mask[corner : corner + side, corner : corner + side, corner : corner + side] = 1
    image[mask > 0] += 200
    return image, mask


def write_nifti(path, array) -> None:
    nib.save(nib.Nifti1Image(array, affine=np.eye(4)), str(path))


def make_folder(root, n: int = 3, size: int = 12):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        image, mask = cube_case(size, corner=2 + i, side=5, seed=i)
        write_nifti(root / "images" / f"case{i}.nii.gz", image)
        write_nifti(root / "labels" / f"case{i}.nii", mask)  # pairing is by name, whatever the flavour
    return root


def test_opacus_per_sample_gradients_of_the_3d_unet_are_exact():
    """Hooks mode (Conv3d, InstanceNorm3d) with functorch fallback (PReLU, ConvTranspose3d): each
    volume's gradient, as if it were alone in the batch."""
    from opacus import GradSampleModule

    task = Segmentation3DTask(image_size=8, channels=(2, 4), strides=(2,))
    torch.manual_seed(0)
    model = task.build_model()
    volumes = torch.rand(3, 1, 8, 8, 8)
    masks = (torch.rand(3, 1, 8, 8, 8) > 0.6).float()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    task.loss(wrapped(volumes), masks).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad_sample is not None and p.grad_sample.shape[0] == 3 for p in params)
    per_sample = [p.grad_sample.clone() for p in params]
    for i in range(3):
        alone = torch.autograd.grad(task.loss(model(volumes[i : i + 1]), masks[i : i + 1]), params)
        for got, want in zip(per_sample, alone, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)


def test_job_model_is_a_dp_compatible_3d_unet():
    task = build_task("segmentation3d", image_size=16)
    model = task.build_model()
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.in_channels == 1
    assert any(isinstance(m, torch.nn.InstanceNorm3d) for m in model.modules())
    assert model(torch.rand(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)


def test_nifti_folder_is_read_resized_and_split(tmp_path):
    make_folder(tmp_path, n=5, size=12)
    assert check_folder("site-1", tmp_path) == 5
    data = VolumeSiteData.from_folder("site-1", tmp_path, image_size=8)
    assert data.names == [f"case{i}" for i in range(5)]
    assert tuple(data.images.shape) == (5, 1, 8, 8, 8) == tuple(data.labels.shape)
    assert set(torch.unique(data.labels).tolist()) == {0.0, 1.0}
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    inside, outside = data.images[data.labels > 0].mean(), data.images[data.labels == 0].mean()
    assert inside > 0.6 > 0.3 > outside  # the mask lands on the bright cube after resizing
    site = Segmentation3DTask(image_size=8, test_fraction=0.2).load_site_data("site-1", 0, 3, tmp_path)
    assert (len(site.train), len(site.test)) == (4, 1)
    assert set(site.train.names).isdisjoint(site.test.names)


def test_missing_label_is_one_line_naming_the_file(tmp_path):
    make_folder(tmp_path, n=2)
    (tmp_path / "labels" / "case1.nii").unlink()
    message = f"site-2: image case1.nii.gz has no matching label in {tmp_path / 'labels'}"
    for check in (lambda: paired_volumes("site-2", tmp_path), lambda: check_folder("site-2", tmp_path)):
        with pytest.raises(SiteDataError) as err:
            check()
        assert str(err.value) == message


def test_mismatched_shapes_are_one_line_naming_both_files(tmp_path):
    make_folder(tmp_path, n=2, size=12)
    write_nifti(tmp_path / "labels" / "case1.nii", np.zeros((12, 12, 10), np.float32))
    pattern = r"^site-3: image case1.nii.gz is 12×12×12 voxels but its label .*labels/case1.nii is 12×12×10$"
    with pytest.raises(SiteDataError, match=pattern):
        check_folder("site-3", tmp_path)
    with pytest.raises(SiteDataError, match=pattern) as err:
        VolumeSiteData.from_folder("site-3", tmp_path, image_size=8)
    assert "\n" not in str(err.value)


def test_empty_folder_and_2d_files_are_one_line(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(SiteDataError) as err:
        Segmentation3DTask().load_site_data("site-1", 0, 3, tmp_path)
    assert str(err.value) == f"site-1: no NIfTI images (.nii.gz, .nii) in {tmp_path / 'images'}"
    write_nifti(tmp_path / "images" / "flat.nii.gz", np.zeros((12, 12), np.float32))
    write_nifti(tmp_path / "labels" / "flat.nii.gz", np.zeros((12, 12), np.float32))
    with pytest.raises(SiteDataError, match=r"^site-1: image .*flat.nii.gz has shape .* segments 3-D volumes$"):
        check_folder("site-1", tmp_path)
    with pytest.raises(SiteDataError, match=r"^site-1: image .*flat.nii.gz has shape .* segments 3-D volumes$"):
        VolumeSiteData.from_folder("site-1", tmp_path, image_size=8)


def test_unreadable_volume_is_one_line(tmp_path):
    make_folder(tmp_path, n=1)
    (tmp_path / "images" / "case0.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(SiteDataError, match=r"^site-1: cannot read image .*case0.nii.gz \(") as err:
        check_folder("site-1", tmp_path)
    assert "\n" not in str(err.value)


def test_job_refuses_a_bad_data_dir_before_any_site_starts(tmp_path, capsys):
    """`clinfed simulate segmentation3d_dp --data-dir BAD`: exit 2 and one line naming the file."""
    make_folder(tmp_path, n=2)
    (tmp_path / "labels" / "case0.nii").unlink()
    with pytest.raises(SiteDataError, match=r"case0\.nii\.gz has no matching label"):
        load_job("segmentation3d_dp").make_recipe(sites=3, rounds=1, data_dir=str(tmp_path))
    rc = cli_main(["simulate", "segmentation3d_dp", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.strip().splitlines() == [
        f"clinfed: --data-dir: image case0.nii.gz has no matching label in {tmp_path / 'labels'}"
    ]


def test_synthetic_sites_are_deterministic_per_seed_and_non_iid():
    a = VolumeSiteData.synthetic(0, 3, n=6, image_size=16, seed=0)
    again = VolumeSiteData.synthetic(0, 3, n=6, image_size=16, seed=0)
    other_seed = VolumeSiteData.synthetic(0, 3, n=6, image_size=16, seed=1)
    last = VolumeSiteData.synthetic(2, 3, n=6, image_size=16, seed=0)
    assert torch.equal(a.images, again.images) and torch.equal(a.labels, again.labels)
    assert not torch.equal(a.images, other_seed.images) and not torch.equal(a.images, last.images)
    first, third = site_profile(0, 3, spatial_dims=3), site_profile(2, 3, spatial_dims=3)
    assert first.num_objs < third.num_objs and first.rad_max > third.rad_max and first.noise_max < third.noise_max
    assert tuple(a.images.shape) == (6, 1, 16, 16, 16) and 0 < a.foreground_fraction() < 0.5


def test_save_examples_draws_orthogonal_slices(tmp_path):
    task = Segmentation3DTask(image_size=16, n_train=2, n_test=2)
    site = task.load_site_data("site-1", 0, 1, None)
    torch.manual_seed(0)
    path = task.save_examples(task.build_model(), site.test, tmp_path / "examples.png", n=2)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1]  # 3 rows × (3 views × 2 volumes)
    metrics = task.evaluate(task.build_model(), site.test)
    assert set(metrics) == {"dice", "loss"} and 0.0 <= metrics["dice"] <= 1.0


def test_hard_volumes_are_smaller_and_fainter_and_unknown_difficulty_is_refused():
    standard = VolumeSiteData.synthetic(1, 3, n=6, image_size=16)
    hard = VolumeSiteData.synthetic(1, 3, n=6, image_size=16, difficulty="hard")
    assert hard.foreground_fraction() < standard.foreground_fraction()

    def contrast(d: VolumeSiteData) -> float:
        return float(d.images[d.labels > 0].mean() - d.images[d.labels == 0].mean())

    assert contrast(hard) < contrast(standard) - 0.2
    assert "synthetic hard" in hard.origin
    with pytest.raises(ValueError, match="difficulty must be one of standard, hard"):
        Segmentation3DTask(difficulty="extreme")
