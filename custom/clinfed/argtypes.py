"""Argument types shared by every `clinfed` subcommand: bad values become one-line usage errors."""

from __future__ import annotations

import argparse
import math

# The training jobs' encrypted wire formats (`--he-format`; `clinfed.fl.recipe`): the compact format on
# the grid tied to the DP noise (default), on the fixed grid, or real-valued CKKS.
HE_FORMATS = ("compact", "compact-fixed", "real")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    """A share of something in (0, 1], e.g. `--compression 0.01` (1 % of an update's coordinates)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got '{text}'") from None
    if not math.isfinite(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def channel_list(text: str) -> list[int]:
    """`--channels 32,64,128`: the imaging jobs' UNet widths, at least two positive integers."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) < 2 or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected at least 2 comma-separated positive integers, got '{text}'")
    return values
