"""The docs a user follows hold together: every relative link in the README and docs/ points to a
file that exists, and the quickstart's two commands are Makefile targets that CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def _relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text(encoding="utf-8")) if "://" not in t]


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{p.relative_to(ROOT)} -> {t}" for p in pages for t in _relative_links(p)
              if not (p.parent / t).exists()]
    assert not broken, "links to missing files:\n" + "\n".join(broken)


def test_link_pattern_finds_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [a](missing.md) and [b](https://example.org/x.md) and [c](page.md#top)")
    assert _relative_links(page) == ["missing.md", "page.md"]
    assert not (tmp_path / "missing.md").exists()


def test_quickstart_is_two_make_targets_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#", 1)[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    assert {"demo", "test"} <= targets
    assert "make test" in (ROOT / ".ci" / "run").read_text()
