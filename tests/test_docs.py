"""The documentation agrees with the code and with itself.

The settings table of ``docs/configuration.md`` is what the settings classes
generate (``tests/docs_config.py``; ``make docs`` rewrites it), every field
has a description, every ``LLAMAS_`` name the pages mention exists, every
relative link and anchor resolves, and the README stays a front door.
Nothing here starts a process or reads the environment.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from tests import docs_config

ROOT = docs_config.ROOT
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 200

#: ``LLAMAS_`` variables that are not settings, and where they are read.
NOT_SETTINGS = {
    "LLAMAS_UP_RUN",  # set by `llamas up` for the processes it starts (router/local/run_record.py)
    "LLAMAS_TEST_REDIS_URL", "LLAMAS_TEST_EMBEDDED_REDIS", "LLAMAS_TEST_POSTGRES_URL",  # the test suite
    "LLAMAS_CHAOS_FULL", "LLAMAS_SCREENSHOTS", "LLAMAS_STATEFUL_EXAMPLES", "LLAMAS_STATEFUL_STEPS",
    "LLAMAS_TEST_CRASH_AT", "LLAMAS_TEST_CRASH_MARKER",  # the crash points of the chaos suite (llama_tasks/faults.py)
}

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
VARIABLE = re.compile(r"LLAMAS_[A-Z0-9_]+")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans: what markdown reads as links and headings."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def links(page: Path) -> list[str]:
    text = prose(page.read_text())
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue  # http(s), mailto: not checked here
        path_part, _, fragment = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            shown = dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest.name
            broken.append(f"{target} (no heading #{fragment} in {shown})")
    return broken


# --- the settings table ---------------------------------------------------------


def test_settings_table_is_generated_from_the_classes() -> None:
    text = docs_config.DOC.read_text()
    assert docs_config.current_table(text) == docs_config.table(), (
        f"the settings table in {docs_config.DOC.relative_to(ROOT)} differs from the settings classes: run make docs"
    )


def test_every_setting_has_a_description() -> None:
    missing = docs_config.missing_descriptions()
    assert missing == [], f"settings fields without Field(description=...): {', '.join(missing)}"


def _settings_classes_in_the_source() -> set[tuple[str, str]]:
    """(module, class) of every class in the packages that derives, however indirectly, from BaseSettings."""
    classes: dict[tuple[str, str], set[str]] = {}
    for package in docs_config.PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ClassDef):
                    classes[(module, node.name)] = {ast.unparse(b).rpartition(".")[2] for b in node.bases}
    settings_names = {"BaseSettings"}
    while True:
        more = {name for (_, name), bases in classes.items() if bases & settings_names} - settings_names
        if not more:
            break
        settings_names |= more
    return {key for key, bases in classes.items() if bases & settings_names}


def test_the_table_covers_every_settings_class() -> None:
    covered = {(cls.__module__, cls.__name__) for cls in docs_config.settings_classes()}
    assert _settings_classes_in_the_source() == covered, (
        "a BaseSettings subclass is defined outside tests/docs_config.py's SETTINGS_MODULES"
    )


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_variable_named_exists(page: Path) -> None:
    known = {v for s in docs_config.settings() for v in re.findall(VARIABLE, s.variable)} | NOT_SETTINGS
    # A name ending in "_" is a prefix (the LLAMAS_AGENT_ settings), not a variable.
    named = {v for v in VARIABLE.findall(page.read_text()) if not v.endswith("_")}
    assert sorted(named - known) == [], f"{page.relative_to(ROOT)} names variables that nothing reads"


# --- links and length --------------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path) -> None:
    assert broken_links(page) == []


def test_readme_is_a_front_door() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_docs_page_is_in_the_table_of_contents() -> None:
    listed = {target.partition("#")[0] for target in links(ROOT / "docs" / "README.md")}
    pages = {p.name for p in (ROOT / "docs").glob("*.md")} - {"README.md"}
    assert sorted(pages - listed) == [], "docs/README.md does not list every page"


def test_the_checks_catch_what_they_are_for(tmp_path: Path) -> None:
    """A missing file, a missing anchor, and a link inside code (which is not a link) are told apart."""
    (tmp_path / "other.md").write_text("# Other page\n\n## A `code` heading: yes\n\n```sh\n# not a heading\n```\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[fine](other.md#a-code-heading-yes) [gone](missing.md) [bad anchor](other.md#not-a-heading)\n"
        "`[in code](nowhere.md)` [web](https://example.org/x.md) [self](#top)\n\n# Top\n"
    )
    assert broken_links(page) == [
        "missing.md (no such file)",
        "other.md#not-a-heading (no heading #not-a-heading in other.md)",
    ]
