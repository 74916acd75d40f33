import os

# Two cores on CI: keep each simulated participant to one intra-op thread so three sites share fairly.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
