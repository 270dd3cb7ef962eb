#!/usr/bin/env python3
"""Non-test Rust lines per workspace crate: every line of src/, less the
`#[cfg(test)]` modules, the figure issue reviews of the layout use.

    scripts/loc.py            a table, largest crate first, with shares
"""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
members = re.search(r"members\s*=\s*\[([^\]]*)\]", (root / "Cargo.toml").read_text())
crates = re.findall(r'"([^"]+)"', members.group(1)) if members else []


def non_test_lines(text: str) -> int:
    lines = text.splitlines()
    out, i = 0, 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*(pub(\(crate\))? )?mod \w+ \{", lines[i + 1]):
            depth = 0
            i += 1
            while i < len(lines):
                depth += lines[i].count("{") - lines[i].count("}")
                i += 1
                if depth <= 0:
                    break
            continue
        out += 1
        i += 1
    return out


counts = {c: sum(non_test_lines(p.read_text()) for p in (root / c / "src").rglob("*.rs")) for c in crates}
total = sum(counts.values())
for c, n in sorted(counts.items(), key=lambda kv: -kv[1]):
    print(f"{c:12} {n:6} {100 * n / total:5.1f} %")
print(f"{'total':12} {total:6}")
sys.exit(0)
