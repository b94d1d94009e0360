"""README is the front door (short, every guide linked); docs/ holds the rest, and no link leads nowhere."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(page.read_text()) if "://" not in target]


def test_readme_is_a_front_door():
    assert len(README.read_text().splitlines()) <= 250


def test_readme_links_every_guide():
    linked = {(ROOT / target).resolve() for target in relative_links(README)}
    assert DOCS and {doc.resolve() for doc in DOCS} <= linked


def test_every_relative_link_resolves():
    broken = [f"{page.relative_to(ROOT)} -> {target}" for page in [README, *DOCS]
              for target in relative_links(page) if not (page.parent / target).exists()]
    assert not broken
