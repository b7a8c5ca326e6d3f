"""The docs cannot drift: docs/configuration.md is what scripts/settings_doc.py renders from `Settings`, and every
relative link in the README and the docs points at a file that exists (so a moved section stays reachable).

No fixture here starts anything: these run in the fast tier (`make test-fast`) and in `make test`, which CI runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from core.settings import Settings
from scripts import settings_doc

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "bench" / "README.md",
    Path(__file__).parent / "README.md",
]
# [text](target) and ![alt](target); a target ends at whitespace or ")" (an optional "title" after a space).
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def test_configuration_doc_is_current() -> None:
    assert settings_doc.DOC.read_text() == settings_doc.render(), (
        "docs/configuration.md is stale: run `.venv/bin/python -m scripts.settings_doc`"
    )


def test_configuration_doc_lists_every_setting() -> None:
    text = settings_doc.DOC.read_text()
    missing = [name for name in Settings.model_fields if f"`TUNESERVE_{name.upper()}`" not in text]
    assert missing == []


def relative_links(path: Path) -> list[str]:
    text = FENCE.sub("", path.read_text())  # a link inside a code block is an example, not a link
    targets = (m.group(1) for m in LINK.finditer(text))
    return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.exists()], ids=lambda d: str(d.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    broken = [t for t in relative_links(doc) if not (doc.parent / t.split("#", 1)[0]).exists()]
    assert broken == [], f"{doc.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_link_check_sees_the_readme_links() -> None:
    # The README links every docs/ file it lists; a regex that matched nothing would pass the check above vacuously.
    links = relative_links(ROOT / "README.md")
    assert "docs/configuration.md" in links
    assert "tests/README.md" in links


def test_readme_stays_an_overview() -> None:
    # The README is the overview; the manual lives in docs/. Past this, a section belongs in a docs/ file.
    assert len((ROOT / "README.md").read_text().splitlines()) < 250
