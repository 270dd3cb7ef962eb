"""What scripts/loc.py and scripts/module-cycles.py both read of the
workspace: its member crates, and a Rust file's text without its
`#[cfg(test)]` modules."""
import pathlib
import re

root = pathlib.Path(__file__).resolve().parent.parent


def crates():
    members = re.search(r"members\s*=\s*\[([^\]]*)\]", (root / "Cargo.toml").read_text())
    return re.findall(r'"([^"]+)"', members.group(1)) if members else []


def without_tests(text):
    """The lines of `text` outside `#[cfg(test)] mod NAME { ... }`."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() == "#[cfg(test)]" and i + 1 < len(lines) and re.match(r"\s*(pub(\(\w+\))? )?mod \w+ \{", lines[i + 1]):
            depth = 0
            i += 1
            while i < len(lines):
                depth += lines[i].count("{") - lines[i].count("}")
                i += 1
                if depth <= 0:
                    break
            continue
        out.append(lines[i])
        i += 1
    return out
