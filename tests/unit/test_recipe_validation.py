"""Claim: a badly configured job is refused before export or submission, with one line naming it."""

import json

import pytest

from clinfed.fl.recipe import SecureFedAvgRecipe, unet_layout
from clinfed.jobs import load_job


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "resnet"}, "unknown task/model 'resnet'"),
        ({"num_rounds": 0}, "rounds must be a positive integer"),
        ({"num_sites": 0}, "needs at least 3 sites"),
        ({"num_sites": 2}, "needs at least 3 sites"),
        ({"min_clients": 5}, "min_clients must be between 1 and 3"),
        ({"dp_args": {"target_epsilon": -1.0}}, "target ε must be a positive number"),
        ({"dp_args": {"delta": 2.0}}, "δ must be in (0, 1)"),
        ({"compression": 0.0}, "compression must be a fraction in (0, 1]"),
        ({"compression": 2}, "compression must be a fraction in (0, 1]"),
    ],
)
def test_bad_job_settings_are_refused(kwargs, message):
    args = {"name": "job", "task": "breast_cancer", "num_rounds": 2, "num_sites": 3, **kwargs}
    with pytest.raises(ValueError) as err:
        SecureFedAvgRecipe(**args)
    assert str(err.value).startswith("job: ") and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("channels", "strides", "image_size", "message"),
    [
        ([32], None, 128, "channels must be at least 2 positive integers"),
        ([8, 0, 32], None, 128, "channels must be at least 2 positive integers"),
        ([8, 16, 32], [2], 128, "one positive stride fewer than channels, got channels [8, 16, 32] / strides [2]"),
        ([8, 16, 32], [2, 2, 2], 128, "one positive stride fewer than channels"),
        ([8, 16, 32, 64], None, 100, "image size 100 is not divisible by the UNet's total stride 8"),
    ],
)
def test_bad_unet_layouts_are_refused(channels, strides, image_size, message):
    with pytest.raises(ValueError) as err:
        unet_layout("job", channels, image_size, strides)
    assert str(err.value).startswith("job: ") and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("job", ["segmentation_dp", "segmentation3d_dp"])
def test_imaging_jobs_take_channels_and_derive_strides(job, tmp_path):
    """`--channels A,B,C` reaches the sites' task (strides 2 between levels) and summary.json."""
    module = load_job(job)
    default = module.make_recipe(sites=3, rounds=1)
    bigger = module.make_recipe(sites=3, rounds=1, channels=[16, 32, 64, 128])
    for recipe, channels, strides in ((default, [8, 16, 32], [2, 2]), (bigger, [16, 32, 64, 128], [2, 2, 2])):
        out = tmp_path / str(len(channels))
        recipe.export(str(out))
        client = json.loads((out / job / "app" / "config" / "config_fed_client.json").read_text())
        task_args = client["executors"][0]["executor"]["args"]["task_args"]
        assert task_args["channels"] == channels and task_args["strides"] == strides
        server = json.loads((out / job / "app" / "config" / "config_fed_server.json").read_text())
        assert server["workflows"][0]["args"]["extra_summary"]["channels"] == channels
    with pytest.raises(ValueError, match=f"^{job}: the UNet needs one positive stride fewer"):
        module.make_recipe(sites=3, rounds=1, channels=[8, 16, 32], strides=[2])


def test_exported_config_carries_every_setting(tmp_path):
    """FedJob serialises components from their attributes: a setting lost there would run silently
    with the default (this happened: rounds and ε fell back to defaults)."""
    recipe = SecureFedAvgRecipe(
        name="job",
        task="breast_cancer",
        num_rounds=7,
        num_sites=3,
        min_clients=2,
        train_args={"lr": 0.25},
        dp_args={"target_epsilon": 1.5},
        compression=0.01,
    )
    recipe.export(str(tmp_path))
    client = json.loads((tmp_path / "job" / "app" / "config" / "config_fed_client.json").read_text())
    args = client["executors"][0]["executor"]["args"]
    assert args["train_args"]["rounds"] == 7 and args["train_args"]["lr"] == 0.25
    assert args["dp_args"]["target_epsilon"] == 1.5
    assert args["compression"] == 0.01
    assert "inject" not in args, "fault hooks must not be a job setting"
    server = json.loads((tmp_path / "job" / "app" / "config" / "config_fed_server.json").read_text())
    ctl = server["workflows"][0]["args"]
    # a job cannot lower the floor of 3 contributors (the controller enforces it again at run time)
    assert ctl["num_rounds"] == 7 and ctl["min_clients"] == 3
    assert ctl["compression"] == 0.01
    assert len(ctl["submission"]) == 16, "every export is a submission of its own"
