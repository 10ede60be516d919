#!/usr/bin/env python3
"""Checks the project's docs: every relative link in README.md and docs/ resolves (the file
exists, and so does the heading an anchor names), and every `make TARGET` they name is a
target of the Makefile. `--self-test` checks the checker on pages with known faults.
Exits 1 with one line per fault."""

import re
import sys
import tempfile
from pathlib import Path

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
MAKE = re.compile(r"`make ([a-z][a-z0-9_-]*)")
TARGET = re.compile(r"^([a-z][a-z0-9_-]*):", re.M)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in prose(page.read_text()).splitlines():
        m = re.match(r"^#{1,6} (.*)", line)
        if not m:
            continue
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def faults(root: Path) -> list[str]:
    pages = [root / "README.md", *sorted((root / "docs").rglob("*.md"))]
    targets = set(TARGET.findall((root / "Makefile").read_text()))
    out = []
    for page in pages:
        text = prose(page.read_text())
        name = page.relative_to(root)
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # http:, https:, mailto:
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                out.append(f"{name}: link to {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                out.append(f"{name}: link to {target}: no heading with that anchor")
        for target in MAKE.findall(text):
            if target not in targets:
                out.append(f"{name}: `make {target}`: no such target in the Makefile")
    return out


def self_test() -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "docs").mkdir()
        (root / "Makefile").write_text("test: build\n\trun\nbuild:\n")
        (root / "docs" / "a.md").write_text("# A page\n\n## The `flag` rules\n")
        (root / "README.md").write_text(
            "[ok](docs/a.md) [ok](docs/a.md#the-flag-rules) [ok](#top) [web](https://x.y/z)\n"
            "# Top\n`make test` and `make build`\n"
            "[gone](docs/b.md) [bad](docs/a.md#nowhere) `make bench`\n"
            "```\n[in code](nowhere.md) `make nothing`\n```\n"
        )
        got = faults(root)
        want = [
            "README.md: link to docs/b.md: no such file",
            "README.md: link to docs/a.md#nowhere: no heading with that anchor",
            "README.md: `make bench`: no such target in the Makefile",
        ]
        assert got == want, f"self-test: got {got}"
    print("check_docs: self-test ok")


def main() -> int:
    if "--self-test" in sys.argv:
        self_test()
        return 0
    root = Path(__file__).resolve().parent.parent
    found = faults(root)
    for f in found:
        print(f"check_docs: {f}")
    if not found:
        print("check_docs: every link and make target resolves")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
