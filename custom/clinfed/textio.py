"""Three small things every part of clinfed needs, written once: one-line errors, JSON for numpy
values, and files only their owner may read.

Why they matter here: an error a person reads must be one line naming the site and the cause (FLARE
logs and summary.json carry it), summary and ledger files hold numpy scalars from accountants and
metrics, and key material (CKKS contexts, intersected patient IDs) must never be world-readable,
not even for the instant between creating a file and chmod-ing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def one_line(exc: BaseException | str, site: str | None = None) -> str:
    """The message of `exc` folded onto one line; with `site`, prefixed by it unless it already names it."""
    text = " ".join(str(exc).split())
    if not text:
        text = type(exc).__name__ if isinstance(exc, BaseException) else ""
    if site is None or text.startswith(site):
        return text
    kind = f"{type(exc).__name__}: " if isinstance(exc, BaseException) and not isinstance(exc, ValueError) else ""
    return f"{site}: {kind}{text}"


def json_default(value: Any) -> Any:
    """`json.dumps(default=...)` for numpy (and torch) scalars and arrays; refuses anything else."""
    if isinstance(value, bytes | bytearray | memoryview):
        raise TypeError("bytes are not JSON: log a digest and a size, never the payload")
    if getattr(value, "ndim", None) == 0 and callable(getattr(value, "item", None)):
        return value.item()
    if callable(getattr(value, "tolist", None)):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_private(path: str | os.PathLike, data: bytes | str, mode: int = 0o600) -> Path:
    """Write `data` to `path` created with `mode` from the first byte (no world-readable window)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


_PLAIN_NAME = __import__("re").compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def safe_job_label(label: str, who: str = "") -> str:
    """`label` if it is a plain file-name part (letters, digits, ``_.-``, not starting with a dot); else
    ValueError, one line. Why: a job's label is job config (untrusted) and becomes part of file names
    (reports, checkpoints): ``../../x`` would write outside the participant's folder (issue 23, item 8)."""
    if not isinstance(label, str) or not _PLAIN_NAME.fullmatch(label):
        prefix = f"{who}: " if who else ""
        raise ValueError(
            f"{prefix}job label {label!r} is not a plain name (letters, digits, _ . -; not starting with a dot); "
            "refusing it as part of a file name"
        )
    return label
