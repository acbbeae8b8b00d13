"""Every relative link in README.md and docs/*.md reaches a file that exists, and its `#anchor` a
heading of that file (GitHub's rule: the heading lower-cased, punctuation but `-` and `_` dropped,
spaces to `-`). A heading renamed without its links was found this way (docs/search.md's
`#the-start`)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(((?!https?:|mailto:)[^)\s#]*)(?:#([^)\s]+))?\)")
HEADING = re.compile(r"^#{1,6} (.*)$", re.M)
CODE = re.compile(r"^```.*?^```", re.M | re.S)


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(h) for h in HEADING.findall(CODE.sub("", page.read_text(encoding="utf-8")))}


def broken(page: Path) -> list[str]:
    out = []
    for target, anchor in LINK.findall(CODE.sub("", page.read_text(encoding="utf-8"))):
        where = (page.parent / target).resolve() if target else page
        if not where.exists():
            out.append(f"{page.name}: {target} (no such file)")
        elif anchor and where.suffix == ".md" and anchor not in anchors(where):
            out.append(f"{page.name}: {target}#{anchor} (no such heading)")
    return out


def test_slug_follows_github():
    assert slug("The start: one cheap trial per family") == "the-start-one-cheap-trial-per-family"
    assert (
        slug("Measured: few-shot, Rotten Tomatoes (2026-12-04)")
        == "measured-few-shot-rotten-tomatoes-2026-12-04"
    )
    assert slug("`data.shots`, `data.draws`") == "datashots-datadraws"


def test_a_link_to_a_missing_heading_is_found(tmp_path):
    page = tmp_path / "a.md"
    page.write_text("# Here\n[ok](#here) [gone](#there) [file](b.md)\n", encoding="utf-8")
    assert broken(page) == ["a.md: #there (no such heading)", "a.md: b.md (no such file)"]


def test_every_doc_link_resolves():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = [p for page in pages for p in broken(page)]
    assert not problems, "\n".join(problems)
