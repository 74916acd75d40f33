#!/usr/bin/env python3
"""Regenerate the benchmark tables in docs/*.md from docs/bench/*.json (`--check`: exit 1 if stale)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "custom"))

from clinfed.bench.tables import render  # noqa: E402


def main() -> int:
    stale = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        new = render(text, ROOT)
        if new != text:
            stale.append(doc.relative_to(ROOT))
            if "--check" not in sys.argv:
                doc.write_text(new)
    for path in stale:
        print(f"{'stale' if '--check' in sys.argv else 'regenerated'}: {path}")
    return 1 if stale and "--check" in sys.argv else 0


if __name__ == "__main__":
    sys.exit(main())
