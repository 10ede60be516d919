#!/usr/bin/env python3
"""Fails when two source files of one crate import each other, directly or in a loop.

Rust allows cycles between modules of a crate; this check does not, because a cycle
means two files share a concern that belongs in a third (see README, "Layout").

An edge A -> B is any path in A's code that names an item of file B: `crate::x::y`,
`super::y`, `self::y`, in `use` lines or inline. `mod b;` declarations are not edges.
Only files under each crate's src/ count; tests and examples are leaves.

Usage: check_module_cycles.py [CRATE_DIR ...]   (default: every workspace crate)
       check_module_cycles.py --self-test
"""

import re
import sys
from pathlib import Path

CRATES = ["proto", "runtime", "gateway", "worker", "tests"]
PATH_RE = re.compile(r"\b(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
USE_GROUP_RE = re.compile(r"\buse\s+(crate|super|self)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^;]*)\}\s*;", re.S)
COMMENT_RE = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)
STRING_RE = re.compile(r'"(?:\\.|[^"\\])*"')


def module_files(src: Path) -> dict:
    """Module path (tuple) -> file, for every .rs file under src/."""
    mods = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src).with_suffix("")
        parts = list(rel.parts)
        if parts in (["lib"], ["main"]):
            parts = []
        elif parts[-1] == "mod":
            parts = parts[:-1]
        if (src / "bin") in f.parents:
            continue
        mods[tuple(parts)] = f
    return mods


def resolve(mods: dict, path: tuple):
    """The file that owns the longest module prefix of `path`."""
    for n in range(len(path), -1, -1):
        if path[:n] in mods:
            return mods[path[:n]]
    return None


def paths_in(text: str):
    """Every (root, segments) path in `text`, with `use x::{a, b::c}` groups expanded."""
    text = STRING_RE.sub('""', COMMENT_RE.sub("", text))
    for m in USE_GROUP_RE.finditer(text):
        root, prefix, body = m.group(1), m.group(2), m.group(3)
        for item in re.split(r"[,{}]", body):
            item = item.strip().split(" as ")[0].strip()
            if item and item != "self" and re.match(r"^[A-Za-z_][A-Za-z0-9_:]*$", item):
                yield root, [s for s in (prefix + "::" + item).split("::") if s]
    for m in PATH_RE.finditer(text):
        yield m.group(1), [s for s in m.group(2).split("::") if s]


def edges_of(mods: dict) -> dict:
    edges = {f: set() for f in mods.values()}
    for here, f in mods.items():
        for root, segs in paths_in(f.read_text()):
            if root == "crate":
                base = ()
            elif root == "self":
                base = here
            else:  # super: the parent of this module
                base = here[:-1]
                while segs and segs[0] == "super":
                    base, segs = base[:-1], segs[1:]
            target = resolve(mods, base + tuple(segs))
            if target is not None and target != f:
                edges[f].add(target)
    return edges


def cycles(edges: dict) -> list:
    """Strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def check(crate: Path) -> list:
    mods = module_files(crate / "src")
    return cycles(edges_of(mods))


def self_test() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "c" / "src"
        (src / "front").mkdir(parents=True)
        (src / "lib.rs").write_text("pub mod front;\npub mod core;\n")
        (src / "front" / "mod.rs").write_text("pub mod a;\npub mod b;\n")
        (src / "front" / "a.rs").write_text("use super::b::{helper, Other as O};\n")
        (src / "front" / "b.rs").write_text("pub fn helper() { crate::front::a::thing(); }\n")
        (src / "core.rs").write_text("// crate::front::a::x is a comment\nfn f() {}\n")
        found = check(Path(d) / "c")
        assert len(found) == 1 and [p.name for p in found[0]] == ["a.rs", "b.rs"], found
        (src / "front" / "b.rs").write_text("pub fn helper() {}\n")
        assert check(Path(d) / "c") == [], "no cycle once b stops importing a"
    print("check_module_cycles: self-test ok")


def main() -> int:
    if sys.argv[1:] == ["--self-test"]:
        self_test()
        return 0
    root = Path(__file__).resolve().parent.parent
    crates = [Path(a) for a in sys.argv[1:]] or [root / c for c in CRATES if (root / c / "src").is_dir()]
    failed = False
    for crate in crates:
        for comp in check(crate):
            failed = True
            names = " <-> ".join(str(p.relative_to(root)) for p in comp)
            print(f"import cycle in {crate.name}: {names}")
    if not failed:
        print(f"check_module_cycles: no import cycle between files in {', '.join(c.name for c in crates)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
