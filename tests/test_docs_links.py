"""Every relative link in README.md and docs/*.md points at a file in the repository, and every
#anchor at a heading of its target, as GitHub renders them: a moved section or file fails here,
not in a reader's browser."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Fenced blocks and code spans are stripped before links and headings are read: the README's
# shell examples open with `# comment` lines, and code spans hold brackets such as `[{..., raw: true}]`.
FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
INLINE_LINK = re.compile(r"\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.M)
ATX_HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
HTML_ANCHOR = re.compile(r"<a\s[^>]*(?:id|name)=\"([^\"]+)\"", re.I)
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def strip_code(markdown: str) -> str:
    return CODE_SPAN.sub("", FENCE.sub("", markdown))


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (a link's label, not its target), lowercased, every
    character but letters, digits, '_', '-' and spaces dropped, each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """The anchors a page offers: its headings' slugs (a repeated slug gets -1, -2, ... as on
    GitHub) and explicit <a id=...> / <a name=...> targets."""
    found, seen = set(), {}
    for match in ATX_HEADING.finditer(FENCE.sub("", markdown)):
        slug = github_slug(match.group(1))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    return found | set(HTML_ANCHOR.findall(markdown))


def link_targets(markdown: str) -> list[str]:
    """The targets of inline links, images and reference definitions outside code."""
    text = strip_code(markdown)
    return INLINE_LINK.findall(text) + REFERENCE_DEF.findall(text)


def broken_links(page: Path, root: Path) -> list[str]:
    """One message per relative link of `page` whose file is missing (or outside `root`, so it
    would be missing from a clone) or whose #anchor names no heading of a Markdown target."""
    broken = []
    for target in link_targets(page.read_text(encoding="utf-8")):
        if not target or SCHEME.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part)
        if not path_part:
            resolved = page
        elif path_part.startswith("/"):
            resolved = root / path_part.lstrip("/")
        else:
            resolved = page.parent / path_part
        resolved = resolved.resolve()
        if not resolved.is_relative_to(root.resolve()):
            broken.append(f"{page.name}: {target} leaves the repository")
        elif not resolved.exists():
            broken.append(f"{page.name}: {target} -> no file {path_part}")
        elif anchor and resolved.suffix == ".md":
            if unquote(anchor).lower() not in anchors(resolved.read_text(encoding="utf-8")):
                broken.append(f"{page.name}: {target} -> no heading #{anchor} in {resolved.name}")
    return broken


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_links_resolve(page):
    assert broken_links(page, ROOT) == []


def test_readme_links_every_docs_page():
    readme_targets = {t.partition("#")[0] for t in link_targets((ROOT / "README.md").read_text())}
    assert {f"docs/{p.name}" for p in DOCS[1:]} <= readme_targets


def test_github_slug():
    assert github_slug("`make run`: the bundled sample in a fresh clone") == (
        "make-run-the-bundled-sample-in-a-fresh-clone")
    assert github_slug("When QL's choice beats the encoder's") == "when-qls-choice-beats-the-encoders"
    assert github_slug("WiSE-FT: interpolating with the base") == "wise-ft-interpolating-with-the-base"
    assert github_slug("The `llm_scores` stage, 2 x faster") == "the-llm_scores-stage-2-x-faster"
    assert github_slug("See [the log](docs/results.md)") == "see-the-log"


def test_checker_catches_a_broken_file_and_a_broken_anchor(tmp_path):
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "a.md").write_text("# Page A\n\n## Real heading\n\n## Real heading\n\nx\n")
    readme = root / "README.md"
    readme.write_text(
        "# Top heading\n\n"
        "[fine](docs/a.md#real-heading) [second of a pair](docs/a.md#real-heading-1)"
        " [self](#top-heading) [web](https://example.org/x.md#nope)\n"
        "[gone](docs/missing.md) [wrong anchor](docs/a.md#no-such-heading)"
        " [no self anchor](#nowhere) [outside](../elsewhere.md)\n\n"
        "```sh\n# a shell comment, not a heading\n[in a fence](docs/fenced-missing.md)\n```\n"
        "`[in a code span](docs/span-missing.md)`\n\n"
        "[ref]: docs/ref-missing.md\n"
    )
    (tmp_path / "elsewhere.md").write_text("# Outside the repository\n")

    assert broken_links(readme, root) == [
        "README.md: docs/missing.md -> no file docs/missing.md",
        "README.md: docs/a.md#no-such-heading -> no heading #no-such-heading in a.md",
        "README.md: #nowhere -> no heading #nowhere in README.md",
        "README.md: ../elsewhere.md leaves the repository",
        "README.md: docs/ref-missing.md -> no file docs/ref-missing.md",
    ]
    assert "a-shell-comment-not-a-heading" not in anchors(readme.read_text())
