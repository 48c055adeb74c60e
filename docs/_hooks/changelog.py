"""MkDocs hook: the site's changelog page shows the repository's CHANGELOG.md.

docs/changelog.md itself holds only a pointer, readable on GitHub, where an include line
would show as a bare path."""

from __future__ import annotations

from pathlib import Path

CHANGELOG = Path(__file__).resolve().parents[2] / "CHANGELOG.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == "changelog.md":
        return CHANGELOG.read_text(encoding="utf-8")
    return markdown
