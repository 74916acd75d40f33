"""Claims about the segmentation task: what a site's folder may hold, what the synthetic federation
looks like, that the network is DP-SGD compatible, and that a short DP-SGD run learns."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from clinfed.data.segmentation import SegmentationSiteData, paired_files, site_profile, synthetic_arrays
from clinfed.plots import plot_rounds, round_series
from clinfed.tasks import build_task
from clinfed.tasks.base import SiteDataError
from clinfed.tasks.segmentation import SegmentationTask, check_dp_compatible
from clinfed.training import DPConfig, SiteTrainer, TrainConfig


def square_case(size: int, top: int, left: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy scan with one bright square, and its mask."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 40, (size, size)).astype(np.float32)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[top : top + side, left : left + side] = 1
    image[mask > 0] += 200
    return image, mask


def write_nifti(path, array) -> None:
    nib.save(nib.Nifti1Image(array, affine=np.eye(4)), str(path))


def make_folder(root, fmt: str, n: int = 3, size: int = 48):
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        image, mask = square_case(size, top=4 + 3 * i, left=8, side=16 + 2 * i, seed=i)
        if fmt == "png":
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / "images" / f"case{i}.png")
            Image.fromarray(mask * 255).save(root / "labels" / f"case{i}.png")
        else:
            # Mixed .nii.gz / .nii: pairing is by name, whatever the NIfTI flavour of each side.
            write_nifti(root / "images" / f"case{i}.nii.gz", image)
            write_nifti(root / "labels" / f"case{i}.nii", mask.astype(np.float32))
    return root


@pytest.mark.parametrize("fmt", ["nifti", "png"])
def test_folder_loader_pairs_images_with_masks(tmp_path, fmt):
    make_folder(tmp_path, fmt, n=3, size=48)
    data = SegmentationSiteData.from_folder("site-1", tmp_path, image_size=32)
    assert len(data) == 3 and data.names == ["case0", "case1", "case2"]
    assert tuple(data.images.shape) == (3, 1, 32, 32) == tuple(data.labels.shape)
    assert set(torch.unique(data.labels).tolist()) == {0.0, 1.0}
    # intensities rescaled to [0, 1], then area-resized (which softens the extremes a little)
    assert 0.0 <= float(data.images.min()) < 0.05 and 0.95 < float(data.images.max()) <= 1.0
    for i in range(3):
        # the mask lands on the bright square (same geometry after resizing: PNG or NIfTI axes alike)
        inside = data.images[i][data.labels[i] > 0].mean()
        outside = data.images[i][data.labels[i] == 0].mean()
        assert inside > 0.6 > 0.3 > outside
        side = (16 + 2 * i) * 32 / 48
        assert float(data.labels[i].sum()) == pytest.approx(side * side, rel=0.15)


def test_site_folder_is_split_into_train_and_held_out(tmp_path):
    make_folder(tmp_path, "png", n=5, size=32)
    site = SegmentationTask(image_size=32, test_fraction=0.2).load_site_data("site-3", 2, 3, tmp_path)
    assert (len(site.train), len(site.test)) == (4, 1)
    assert set(site.train.names).isdisjoint(site.test.names)
    assert "5 image/label pairs" in site.description


def test_missing_labels_folder_is_one_line_naming_site_and_path(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(SiteDataError) as err:
        SegmentationTask().load_site_data("site-2", 1, 3, tmp_path)
    assert str(err.value) == f"site-2: labels folder {tmp_path / 'labels'} does not exist"


def test_missing_data_folder_names_site_and_path():
    with pytest.raises(SiteDataError, match=r"^site-2: data folder /nonexistent/seg does not exist$"):
        SegmentationTask().load_site_data("site-2", 1, 3, "/nonexistent/seg")


def test_image_without_label_is_refused(tmp_path):
    make_folder(tmp_path, "png", n=2, size=32)
    (tmp_path / "labels" / "case1.png").unlink()
    with pytest.raises(SiteDataError) as err:
        paired_files("site-2", tmp_path)
    assert str(err.value) == f"site-2: image case1.png has no matching label in {tmp_path / 'labels'}"
    assert "\n" not in str(err.value)


def test_label_without_image_and_mismatched_size_are_refused(tmp_path):
    make_folder(tmp_path, "png", n=2, size=32)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "labels" / "stray.png")
    with pytest.raises(SiteDataError, match=r"^site-4: label stray.png has no matching image in .*images$"):
        paired_files("site-4", tmp_path)
    (tmp_path / "labels" / "stray.png").unlink()
    Image.fromarray(np.zeros((20, 32), np.uint8)).save(tmp_path / "labels" / "case0.png")
    with pytest.raises(SiteDataError, match=r"^site-4: image case0.png is .* px but its label .*case0.png is"):
        SegmentationSiteData.from_folder("site-4", tmp_path, image_size=32)


def test_unreadable_image_is_one_line(tmp_path):
    make_folder(tmp_path, "png", n=1, size=32)
    (tmp_path / "images" / "case0.png").write_bytes(b"not a png")
    with pytest.raises(SiteDataError, match=r"^site-1: cannot read image .*case0.png \(") as err:
        SegmentationSiteData.from_folder("site-1", tmp_path, image_size=32)
    assert "\n" not in str(err.value)


def test_synthetic_sites_are_deterministic_and_non_iid():
    a = SegmentationSiteData.synthetic(0, 3, n=24, image_size=64)
    again = SegmentationSiteData.synthetic(0, 3, n=24, image_size=64)
    last = SegmentationSiteData.synthetic(2, 3, n=24, image_size=64)
    assert torch.equal(a.images, again.images) and torch.equal(a.labels, again.labels)
    assert not torch.equal(a.images, last.images)
    first, third = site_profile(0, 3), site_profile(2, 3)
    assert first.num_objs < third.num_objs and first.rad_max > third.rad_max and first.noise_max < third.noise_max
    # background noise: the clean first site's background is darker than the noisy last site's
    background = [float(d.images[d.labels == 0].mean()) for d in (a, last)]
    assert background[1] > background[0] + 0.1


def test_synthetic_images_are_generated_at_least_128_px():
    images, labels = synthetic_arrays(site_profile(1, 3), n=2)
    assert images.shape == labels.shape == (2, 128, 128)
    with pytest.raises(ValueError, match="at least 128 px"):
        synthetic_arrays(site_profile(1, 3), n=2, source_size=64)


def test_model_is_dp_compatible_and_the_check_catches_what_opacus_misses():
    task = build_task("segmentation", image_size=64)
    check_dp_compatible(task.build_model())
    with pytest.raises(ValueError, match="works in place"):
        check_dp_compatible(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True)))
    with pytest.raises(ValueError, match="not DP-SGD compatible"):
        check_dp_compatible(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))


def test_batch_loss_is_the_mean_of_per_image_losses():
    """Opacus' per-sample clipping is only right if the batch loss decomposes over images."""
    task = SegmentationTask(image_size=32)
    torch.manual_seed(0)
    output = torch.randn(6, 2, 32, 32)
    target = (torch.rand(6, 1, 32, 32) > 0.7).float()
    per_image = torch.stack([task.loss(output[i : i + 1], target[i : i + 1]) for i in range(6)])
    assert float(task.loss(output, target)) == pytest.approx(float(per_image.mean()), rel=1e-5)


def test_short_dp_run_beats_the_untrained_model():
    task = SegmentationTask(image_size=32, n_train=256, n_test=32)
    site = task.load_site_data("site-1", 0, 2, None)
    trainer = SiteTrainer(
        task,
        site,
        TrainConfig(rounds=4, local_epochs=1, batch_size=32, lr=0.03, optimizer="adam"),
        DPConfig(enabled=True, target_epsilon=8.0, max_grad_norm=0.1),
    )
    before = trainer.evaluate()
    assert set(before) == {"dice", "loss"}
    for _ in range(4):
        trainer.train_round()
    after = trainer.evaluate()
    eps = trainer.engine.accountant.get_epsilon(delta=1e-5)
    assert eps <= 8.0 + 1e-6
    assert after["dice"] > before["dice"] + 0.3, (before, after)
    assert after["dice"] > 0.75 and after["loss"] < before["loss"]


def test_save_examples_and_round_plot_write_pngs(tmp_path):
    task = SegmentationTask(image_size=32, n_train=4, n_test=4)
    site = task.load_site_data("site-1", 0, 1, None)
    torch.manual_seed(0)
    path = task.save_examples(task.build_model(), site.test, tmp_path / "examples.png", n=3)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size[0] > png.size[1] / 2
    summary = {
        "job": "segmentation_dp",
        "encrypted": True,
        "rounds": [
            {"round": 0, "sites": {"site-1": _ok(0.5, 4.0), "site-2": _ok(0.7, 4.1)}},
            {"round": 1, "sites": {"site-1": _ok(0.9, 8.0), "site-2": {"status": "refused", "epsilon": 4.1}}},
        ],
        "final": {"metrics": {"dice": 0.88}},
        "privacy": {"site-1": {"budget": 10.0}},
    }
    rounds, means, eps = round_series(json.loads(json.dumps(summary)), "dice")
    assert rounds == [0, 1] and means == pytest.approx([0.6, 0.9])  # refused site-2 is not counted as 0
    assert eps["site-2"] == [(0, 4.1), (1, 4.1)]
    with Image.open(plot_rounds(summary, tmp_path / "rounds.png", "dice")) as png:
        assert png.format == "PNG"


def _ok(dice: float, eps: float) -> dict:
    return {"status": "ok", "metrics": {"dice": dice}, "epsilon": eps}


def test_opacus_per_sample_gradients_of_the_unet_are_exact():
    """Hooks mode with functorch fallback (PReLU, transposed conv): each image's gradient, as if alone."""
    from opacus import GradSampleModule

    task = SegmentationTask(image_size=16)
    torch.manual_seed(0)
    model = task.build_model()
    images = torch.rand(3, 1, 16, 16)
    masks = (torch.rand(3, 1, 16, 16) > 0.6).float()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    task.loss(wrapped(images), masks).backward()
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = [p.grad_sample.clone() for p in params]
    for i in range(3):
        alone = torch.autograd.grad(task.loss(model(images[i : i + 1]), masks[i : i + 1]), params)
        for got, want in zip(per_sample, alone, strict=True):
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-6)


def test_hard_difficulty_draws_smaller_fainter_lesions_and_unknown_is_refused():
    from clinfed.data.segmentation import SegmentationSiteData, site_profile
    from clinfed.tasks.segmentation import SegmentationTask

    standard = SegmentationSiteData.synthetic(1, 3, 6, difficulty="standard")
    hard = SegmentationSiteData.synthetic(1, 3, 6, difficulty="hard")
    assert hard.foreground_fraction() < 0.2 * standard.foreground_fraction()
    assert site_profile(1, 3, "hard").blur_noise > 0 and site_profile(1, 3).blur_noise == 0

    # lesion vs background contrast: the mean intensity gap shrinks
    def gap(d):
        img, lab = d.images.numpy(), d.labels.numpy() > 0
        return float(img[lab].mean() - img[~lab].mean())

    assert gap(hard) < 0.7 * gap(standard)  # measured 0.38 vs 0.61
    with pytest.raises(ValueError, match="difficulty"):
        SegmentationTask(difficulty="impossible")


def test_public_pretraining_gives_a_start_that_finds_lesions_and_uses_no_site_image():
    """The technique that rescues ε = 1 on `hard`: a start trained on public synthetic scans (its own
    seed, no site's image in it) already segments a site's held-out lesions; a random start does not."""
    import torch

    from clinfed.data.segmentation import SegmentationSiteData
    from clinfed.tasks.segmentation import PUBLIC_SEED, SegmentationTask

    torch.manual_seed(0)
    plain = SegmentationTask(image_size=64, difficulty="hard").build_model()
    torch.manual_seed(0)
    task = SegmentationTask(image_size=64, difficulty="hard", public_pretrain=128, public_pretrain_epochs=6)
    pretrained = task.build_model()
    site = SegmentationSiteData.synthetic(1, 3, 24, image_size=64, difficulty="hard")
    # measured: 0.42 pretrained, 0.03 from a random start (it marks everything as lesion)
    assert task.evaluate(pretrained, site)["dice"] > 0.25 > 0.1 > task.evaluate(plain, site)["dice"]
    public = SegmentationSiteData.synthetic(1, 5, 24, image_size=64, seed=PUBLIC_SEED, difficulty="hard")
    assert not any(torch.equal(a, b) for a in public.images for b in site.images)
