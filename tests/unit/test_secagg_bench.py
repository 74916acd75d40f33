"""`clinfed bench secagg`: the masks cost no bytes, setup grows with the sites, the table renders from JSON."""

import json
import subprocess
import sys

import pytest

from clinfed.bench.secagg_bench import markdown_table, ratios, run_secagg_bench
from clinfed.bench.tables import render


@pytest.fixture(scope="module")
def result():
    return run_secagg_bench(params=6_000, sites=3, repeats=1, setup_sites=(3, 6), large_params=6_000, large_sites=4)


def test_masks_add_no_bytes_and_no_error(result):
    rows = result["round"]
    assert set(rows) == {"plaintext", "flare_he", "ours", "ours_secagg"}
    # the masks live in the ciphertext's own ring: same wire size, same precision as the unmasked format
    assert rows["ours_secagg"]["bytes_per_param"] == pytest.approx(rows["ours"]["bytes_per_param"], rel=0.02)
    assert rows["ours_secagg"]["max_rel_error"] < 1e-4
    assert ratios(result)["bytes_vs_flare_he"] < 0.1


def test_setup_grows_with_the_sites(result):
    small, big = result["setup"]
    assert (small["sites"], big["sites"]) == (3, 6)
    assert big["bytes_down_per_site"] == pytest.approx(2 * small["bytes_down_per_site"], rel=0.05)  # the roster
    assert big["bytes_up_per_site"] == pytest.approx(small["bytes_up_per_site"], rel=0.05)  # one signed key
    assert result["large"]["sites"] == 4 and result["large"]["wall_seconds"] > 0


def test_the_docs_block_is_rendered_from_the_json(result, tmp_path):
    (tmp_path / "secagg.json").write_text(json.dumps(result))
    doc = "<!-- generated: secagg (secagg.json) -->\nstale\n<!-- end generated: secagg -->"
    out = render(doc, tmp_path)
    assert markdown_table(result) in out and "stale" not in out
    assert "| 6 |" in out and "Large: one ours_secagg round of 6,000 parameters × 4 sites" in out


def test_fewer_than_three_sites_is_a_usage_error():
    cmd = [sys.executable, "-m", "clinfed.cli", "bench", "secagg", "--setup-sites", "2,10"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 2 and "at least 3 sites" in proc.stderr
