"""Claim: bad command-line input exits 2 with one clear line and no traceback."""

import subprocess
import sys

import pytest

CASES = [
    (["simulate", "no_such_job"], "unknown job 'no_such_job'"),
    (["simulate", "breast_cancer_dp", "--rounds", "0"], "--rounds"),
    (["simulate", "breast_cancer_dp", "--sites", "x"], "--sites"),
    (["simulate", "breast_cancer_dp", "--sites", "0"], "--sites"),
    (["simulate", "breast_cancer_dp", "--epsilon", "-1"], "--epsilon"),
    (["simulate", "breast_cancer_dp", "--inject", "site-2=meteor"], "--inject"),
    (["simulate", "segmentation_dp", "--compression", "0"], "--compression: expected a fraction in (0, 1]"),
    (["simulate", "segmentation_dp", "--compression", "1.5"], "--compression: expected a fraction in (0, 1]"),
    (["bench", "stream", "--params", "1000", "--compression", "2"], "--compression: expected a fraction in (0, 1]"),
    (["simulate", "segmentation_dp", "--channels", "32"], "--channels: expected at least 2 comma-separated"),
    (["simulate", "segmentation_dp", "--channels", "32,x,128"], "--channels: expected at least 2 comma-separated"),
    (["simulate", "segmentation3d_dp", "--channels", "8,0,32"], "--channels: expected at least 2 comma-separated"),
    (["simulate", "breast_cancer_dp", "--channels", "8,16"], "--channels is for segmentation_dp and segmentation3d_dp"),
    # 7 levels halve the 32-voxel volume 6 times: refused when the job is built, before anything is written
    (
        ["export", "segmentation3d_dp", "--out", "/nonexistent/export", "--channels", "2,2,2,2,2,2,2"],
        "segmentation3d_dp: image size 32 is not divisible by the UNet's total stride 64",
    ),
    (["export", "breast_cancer_dp"], "--out"),
    (["simulate", "breast_cancer_dp", "--data-dir", "/nonexistent/site-data"], "/nonexistent/site-data"),
    (["submit", "breast_cancer_dp", "--kit", "/nonexistent/kit"], "/nonexistent/kit: not an admin startup kit"),
]


@pytest.mark.parametrize(("argv", "expected"), CASES)
def test_bad_arguments_exit_2_with_one_line(argv, expected):
    proc = subprocess.run([sys.executable, "-m", "clinfed.cli", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr
