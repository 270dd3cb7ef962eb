#!/usr/bin/env python3
"""Non-test Rust lines per workspace crate: every line of src/, less the
`#[cfg(test)]` modules, the figure issue reviews of the layout use.

    scripts/loc.py            a table, largest crate first, with shares
"""
from rustsrc import crates, root, without_tests

counts = {
    c: sum(len(without_tests(p.read_text())) for p in (root / c / "src").rglob("*.rs"))
    for c in crates()
}
total = sum(counts.values())
for c, n in sorted(counts.items(), key=lambda kv: -kv[1]):
    print(f"{c:12} {n:6} {100 * n / total:5.1f} %")
print(f"{'total':12} {total:6}")
