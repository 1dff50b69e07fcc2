"""Every relative link and picture of the README and docs/ points to a file (and heading) that exists."""

from __future__ import annotations

import re

import pytest

from conftest import load_script

check_readme = load_script("check_readme")
PAGES = check_readme.pages()
ROOT = check_readme.ROOT
RELEASE_TALK = re.compile(r"this release|previous release|\blease|\blent\b|this session|time ran out", re.I)


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_every_relative_link_resolves(page):
    links = check_readme.relative_links(page)
    broken = [why for target in links if (why := check_readme.broken_link(page, target))]
    assert not broken, "\n".join(broken)


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    """The check can fail: a missing file, a missing heading, a path out of the repository."""
    (tmp_path / "other.md").write_text("# Other page\n\n## What's `new`, here?\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#whats-new-here) [ok](other.md#twice-1) [ok](#page) ![pic](other.md)\n"
        '<img src="missing.png"> [gone](missing.md) [no anchor](other.md#nowhere) [up](../../etc/passwd)\n'
        "[web](https://example.com) `[code](not-a-link.md)`\n")
    links = check_readme.relative_links(page)
    assert links == ["other.md#whats-new-here", "other.md#twice-1", "#page", "other.md", "missing.png",
                     "missing.md", "other.md#nowhere", "../../etc/passwd"]
    broken = {target for target in links if check_readme.broken_link(page, target, root=tmp_path)}
    assert broken == {"missing.png", "missing.md", "other.md#nowhere", "../../etc/passwd"}


def test_the_docs_index_lists_every_page_and_the_readme_links_the_index():
    index = check_readme.DOCS / "index.md"
    listed = {target.partition("#")[0] for target in check_readme.relative_links(index)}
    assert {p.name for p in check_readme.DOCS.glob("*.md")} - {"index.md"} <= listed
    assert "docs/index.md" in check_readme.relative_links(check_readme.README)


def test_every_picture_in_docs_is_shown_on_a_page():
    shown = {(page.parent / target).resolve() for page in PAGES for target in check_readme.relative_links(page)}
    assert {png.resolve() for png in check_readme.DOCS.glob("*.png")} <= shown


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_pages_speak_in_the_present_tense_about_the_software(page):
    """No release history, machine loans or runs cut short: that belongs in CHANGELOG.md, or nowhere."""
    assert not RELEASE_TALK.findall(page.read_text()), RELEASE_TALK.findall(page.read_text())
