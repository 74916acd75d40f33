"""Claim: the noise a site plans meets the job's target ε, also when a resumed job already spent some."""

import pytest

from clinfed.privacy.ledger import epsilon_of
from clinfed.training import noise_for_target


def test_fresh_job_noise_reaches_the_target_over_the_planned_steps():
    sigma = noise_for_target(3.0, 1e-5, 0.125, 40, [])
    assert epsilon_of([[sigma, 0.125, 40]], 1e-5) == pytest.approx(3.0, abs=0.02)


def test_resumed_job_counts_what_its_first_run_spent():
    prior = [[1.8, 0.125, 16]]
    sigma = noise_for_target(3.0, 1e-5, 0.125, 24, prior)
    total = epsilon_of([*prior, [sigma, 0.125, 24]], 1e-5)
    assert total <= 3.0 and total == pytest.approx(3.0, abs=0.01)
    # more noise than a fresh plan for the same remaining steps, since part of the budget is gone
    assert sigma > noise_for_target(3.0, 1e-5, 0.125, 24, [])


def test_a_re_created_site_keeps_its_runs_noise_without_a_search():
    """FLARE's simulator re-creates executors mid-run: the run's σ, continued, still meets the target."""
    sigma = noise_for_target(3.0, 1e-5, 0.125, 40, [])
    again = noise_for_target(3.0, 1e-5, 0.125, 24, [[sigma, 0.125, 16]])
    assert again == sigma
    assert epsilon_of([[sigma, 0.125, 16], [again, 0.125, 24]], 1e-5) <= 3.0
