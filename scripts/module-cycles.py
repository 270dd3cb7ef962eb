#!/usr/bin/env python3
"""Lists the modules of each workspace crate that import each other,
directly or round a longer loop: every strongly connected group of two or
more modules, where a module is a file of src/ and an edge is a path to
another module (`crate::a::b`, `super::x`, `self::y` in a `use` or in an
expression). A module and its own parent or child are not counted: a
parent declares its children and re-exports them, and a child may use what
its parent defines. Test modules (`#[cfg(test)]`) are left out.

    scripts/module-cycles.py     prints each loop; exits 1 if there is one
"""
import re
import sys

from rustsrc import crates, root, without_tests


def strip_tests(text):
    return "\n".join(re.sub(r"//.*", "", line) for line in without_tests(text))


def module_path(src, f):
    rel = f.relative_to(src).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] in ("mod", "lib", "main"):
        parts = parts[:-1]
    return tuple(parts)


def expand_use(text):
    """`use a::{b, c::{d}}` -> a::b, a::c::d; other paths pass through."""
    paths = []
    for m in re.finditer(r"\buse\s+([^;]+);", text, re.S):
        stack = [("", m.group(1).replace("\n", " "))]
        while stack:
            prefix, body = stack.pop()
            body = body.strip()
            b = body.find("{")
            if b < 0:
                for item in body.split(","):
                    item = item.strip().split(" as ")[0].strip()
                    if item:
                        paths.append(prefix + item)
                continue
            head, inner = body[:b], body[b + 1 : body.rfind("}")]
            depth, start, items = 0, 0, []
            for k, ch in enumerate(inner):
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                elif ch == "," and depth == 0:
                    items.append(inner[start:k])
                    start = k + 1
            items.append(inner[start:])
            for it in items:
                if it.strip():
                    stack.append((prefix + head, it))
    others = re.findall(r"\b((?:crate|super|self)(?:::\w+)+)", re.sub(r"\buse\s+[^;]+;", "", text, flags=re.S))
    return paths + others


loops = []
for crate in crates():
    src = root / crate / "src"
    files = {module_path(src, f): f for f in src.rglob("*.rs")}
    mods = set(files)
    edges = {m: set() for m in mods}
    for m, f in files.items():
        for p in expand_use(strip_tests(f.read_text())):
            segs = p.split("::")
            if segs[0] == "crate":
                base, rest = (), segs[1:]
            elif segs[0] == "self":
                base, rest = m, segs[1:]
            elif segs[0] == "super":
                base, rest = m[:-1], segs[1:]
                while rest and rest[0] == "super":
                    base, rest = base[:-1], rest[1:]
            else:
                continue
            target = tuple(base)
            for s in rest:
                if target + (s,) in mods:
                    target = target + (s,)
                else:
                    break
            if target != m:
                edges[m].add(target)
    # Strongly connected groups (Tarjan), ignoring parent-child edges.
    def related(a, b):
        return a[: len(b)] == b or b[: len(a)] == a

    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if related(v, w):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(group)

    sys.setrecursionlimit(10000)
    for v in sorted(mods):
        if v not in index:
            visit(v)
    for g in out:
        names = sorted(str(files[x].relative_to(root)) for x in g)
        loops.append(names)

for g in loops:
    print("import loop: " + " <-> ".join(g))
print(f"{len(loops)} import loop(s) among the modules of {len(crates())} crates")
sys.exit(1 if loops else 0)
