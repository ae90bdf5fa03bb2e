"""The documentation holds together: every relative link resolves, the pages keep to their length."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MAX_LINES = {"README.md": 250, "docs/architecture.md": 120}

FENCE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target "title") and ![alt](target); the text may hold one level of brackets.
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
REFERENCE_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)=[\"']([^\"']+)[\"']", re.IGNORECASE)


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line outside fenced code blocks, code spans blanked out."""
    out, fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        opening = FENCE.match(line)
        if fence:
            if opening and opening.group(1)[0] == fence[0] and len(opening.group(1)) >= len(fence):
                fence = None
            continue
        if opening:
            fence = opening.group(1)
            continue
        out.append((number, CODE_SPAN.sub(lambda m: "`" + "x" * len(m.group(2)) + "`", line)))
    return out


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text, lower case, without punctuation or symbols, spaces as hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links and images keep their text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every `#anchor` a link into `page` may use: its headings' slugs (repeats numbered) and HTML anchors."""
    found: set[str] = set()
    seen: dict[str, int] = {}
    text = page.read_text(encoding="utf-8")
    raw = {number: line for number, line in enumerate(text.splitlines(), 1)}
    for number, _ in prose_lines(text):
        line = raw[number]
        found.update(HTML_ANCHOR.findall(line))
        heading = HEADING.match(line)
        if heading:
            base = slug(heading.group(2))
            count = seen.get(base, 0)
            seen[base] = count + 1
            found.add(base if count == 0 else f"{base}-{count}")
    return found


def links(page: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link in `page`, outside code."""
    out = []
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        targets = [m.group(1) for m in INLINE_LINK.finditer(line)] + [m.group(1) for m in REFERENCE_DEF.finditer(line)]
        out.extend((number, target.strip("<>")) for target in targets)
    return out


def broken(page: Path, target: str) -> str | None:
    """Why a relative link from `page` does not resolve, or None when it does (or is not relative)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("//"):
        return None  # a URL (https:, mailto:, ...): not checked here
    path_part, _, anchor = target.partition("#")
    dest = (page.parent / unquote(path_part)).resolve() if path_part else page
    if not dest.exists():
        return f"{dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist"
    if anchor and dest.suffix == ".md" and unquote(anchor) not in anchors(dest):
        known = ", ".join(sorted("#" + a for a in anchors(dest)))
        return f"no heading gives #{anchor} in {dest.relative_to(ROOT)} (its anchors: {known})"
    return None


def test_pages_exist():
    assert (ROOT / "README.md").is_file() and (ROOT / "docs/architecture.md").is_file()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    problems = [f"{page.relative_to(ROOT)}:{number}: link '{target}': {why}"
                for number, target in links(page) if (why := broken(page, target))]
    assert not problems, "broken links:\n" + "\n".join(problems)


@pytest.mark.parametrize("name,limit", sorted(MAX_LINES.items()))
def test_page_length(name, limit):
    lines = len((ROOT / name).read_text(encoding="utf-8").splitlines())
    assert lines <= limit, f"{name} has {lines} lines; keep it to {limit} (move detail into docs/)"


def test_test_markers_stand_right_before_a_fence():
    """`<!-- test: run -->` marks the bash block that follows it, `<!-- test: python -->` the Python one."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    expected = {"run": "```bash", "python": "```python"}
    problems = []
    for number, line in enumerate(lines, 1):
        marker = re.fullmatch(r"<!-- test: (\w+) -->", line.strip())
        if marker:
            want = expected.get(marker.group(1))
            following = lines[number] if number < len(lines) else ""
            if want is None or following.strip() != want:
                problems.append(f"README.md:{number}: {line.strip()} is followed by {following!r}, not {want!r}")
    assert not problems, "\n".join(problems)


def test_slug_follows_githubs_rules():
    assert slug("Run it without a GPU or network: the offline profile") == \
        "run-it-without-a-gpu-or-network-the-offline-profile"
    assert slug("The queued 3 × 3 sweep") == "the-queued-3--3-sweep"
    assert slug("A typo in `-S`") == "a-typo-in--s"
    assert slug("Ctrl-C and stopping a run") == "ctrl-c-and-stopping-a-run"
