"""The documentation stands on its own: every relative link in every Markdown file of the repository resolves
to a file in it (and a #anchor to a heading of that file), and no document points outside the repository."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"runs", "build", "node_modules"}
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target) and ![alt](target)
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)  # [label]: target
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
OUTSIDE = re.compile(r"\.\./shared|(?<![\w.~-])/work/")


def markdown_files(root: Path = ROOT) -> list[Path]:
    return sorted(p for p in root.rglob("*.md")
                  if not any(part.startswith(".") or part in SKIP_DIRS or part.endswith(".egg-info")
                             for part in p.relative_to(root).parts[:-1]))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]|<[^>]+>", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            out.add(s if s not in seen else f"{s}-{seen[s]}")
            seen[s] = seen.get(s, 0) + 1
    return out


def broken_links(path: Path, root: Path = ROOT) -> list[str]:
    """'file: target (why)' for each relative link of ``path`` that does not resolve inside ``root``."""
    text = FENCE.sub("", path.read_text())
    bad = []
    for target in LINK.findall(text) + REFERENCE.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(root)}: {target}"
        if file_part.startswith("/") or not dest.is_relative_to(root.resolve()):
            bad.append(f"{where} (outside the repository)")
        elif not dest.exists():
            bad.append(f"{where} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{where} (no heading #{anchor})")
    return bad


def test_the_checker_catches_each_kind_of_bad_link(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## 8. The paper's results\n")
    doc = tmp_path / "README.md"
    doc.write_text("[ok](docs/a.md#8-the-papers-results) [ok](#top) ![img](docs/a.md) [web](https://x.invalid/y)\n"
                   "# Top\n[gone](docs/b.md) [anchor](docs/a.md#nowhere) [up](../x.md)\n"
                   "```\n[in code](not/checked.md)\n```\n")
    bad = broken_links(doc, tmp_path)
    assert [b.split(" (")[1] for b in bad] == ["no such file)", "no heading #nowhere)", "outside the repository)"], bad
    assert [p.name for p in markdown_files(tmp_path)] == ["README.md", "a.md"]


def test_every_relative_link_in_the_docs_resolves():
    files = markdown_files()
    assert {"README.md", "REPRODUCTION.md", "BENCHMARKS.md"} <= {p.name for p in files}
    assert ROOT / "docs" / "method.md" in files
    bad = [b for p in files for b in broken_links(p)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_doc_points_outside_the_repository(path):
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)


def test_every_rmn_function_the_readme_names_exists():
    """`rmn.x(...)` / `rmn.x.y(...)` written in README.md resolve (``rmn.route`` is a function, not the module)."""
    import importlib
    import re

    import rmn

    text = (ROOT / "README.md").read_text()
    names = sorted(set(re.findall(r"\brmn((?:\.[A-Za-z_]\w*)+)\(", text)))
    assert names, "the README names rmn functions"
    for dotted in names:
        obj = rmn
        for part in dotted.strip(".").split("."):
            if not hasattr(obj, part):  # a submodule not imported by `import rmn` (rmn.backbones.x)
                obj = importlib.import_module(f"{obj.__name__}.{part}") if hasattr(obj, "__path__") else None
            else:
                obj = getattr(obj, part)
            assert obj is not None, f"README names rmn{dotted}, which does not exist"
        assert callable(obj), f"README calls rmn{dotted}, which is not callable"
