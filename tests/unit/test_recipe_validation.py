"""Claim: a badly configured job is refused before export or submission, with one line naming it."""

import json

import pytest

from clinfed.fl.recipe import SecureFedAvgRecipe


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
