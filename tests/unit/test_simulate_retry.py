"""`clinfed simulate` and FLARE's simulator start-up failures."""


def test_a_simulated_site_that_never_started_is_told_apart_from_a_refusal(tmp_path):
    """`clinfed simulate` runs a job again only when a simulated site never answered admission and
    nothing was trained or released (FLARE's simulator start-up failure), never after a refusal."""
    import json

    from clinfed.simulate import _never_started

    path = tmp_path / "summary.json"
    cases = [
        ({"rounds_completed": 0, "admission": {"site-1": {"reason": "site-1: no answer to the admission request"}}}, 1),
        ({"rounds_completed": 2, "admission": {"site-1": {"reason": "site-1: no answer to the admission request"}}}, 0),
        ({"rounds_completed": 0, "admission": {"site-1": {"reason": "site-1: local policy requires DP"}}}, 0),
    ]
    for summary, expected in cases:
        path.write_text(json.dumps(summary))
        assert len(_never_started(path)) == expected
