#!/usr/bin/env python3
"""No Rust source file of the workspace holds more than 500 lines before its unit tests
(its first `#[cfg(test)]`, or its end): a longer one holds two jobs. Test files under a
crate's `tests/` count whole. Exits 1 naming each file over the limit."""

import subprocess
import sys
from pathlib import Path

LIMIT = 500


def lines_before_tests(text: str) -> int:
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#[cfg(test)]"):
            return i
    return len(lines)


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.rs"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout.split()
    over = []
    for name in files:
        path = root / name
        if path.exists():
            n = lines_before_tests(path.read_text())
            if n > LIMIT:
                over.append(f"check_file_length: {name}: {n} lines before its tests (at most {LIMIT})")
    for line in over:
        print(line)
    if not over:
        print(f"check_file_length: every source file holds at most {LIMIT} lines before its tests")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
