import os

# Two cores on CI: keep each simulated participant to one intra-op thread so three sites share fairly.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest


def pytest_itemcollected(item):
    """Under `pytest -n N --dist loadgroup` (./scripts/test.sh), a test file is one unit of work unless it
    names its own `xdist_group`: its module fixtures (a simulator run shared by several tests) are then
    built once, in one worker, not once per worker. (Marked at collection: xdist reads the groups in
    its own `pytest_collection_modifyitems`.)"""
    if item.get_closest_marker("xdist_group") is None:
        item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))


def pytest_collection_modifyitems(config, items):
    """Benchmark-sized claims (marker `bench`, minutes each) run only with CLINFED_BENCH=1, so the
    default suite stays under its 30-minute budget on 2 cores; `clinfed bench ...` prints the same numbers."""
    if os.environ.get("CLINFED_BENCH") == "1":
        return
    skip = pytest.mark.skip(reason="benchmark-sized: run with CLINFED_BENCH=1 ./scripts/test.sh -m bench")
    for item in items:
        if "bench" in item.keywords:
            item.add_marker(skip)
