"""The shipped evaluation sets in data/eval/ are the bytes their README's checksum table lists.

Every score `make full` and the slow tests report is measured on these files, so a changed byte
(a careless edit, an end-of-line conversion on checkout) would move the numbers silently. The
table in data/eval/README.md is the one record of what ships: every file but the README must have
a row, and every row a file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

EVAL = Path(__file__).resolve().parents[1] / "data" / "eval"
README = EVAL / "README.md"
# A row of the checksum table: | `path` | 1,234 | `md5` |
ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*([\d,]+)\s*\|\s*`([0-9a-f]{32})`\s*\|\s*$")


def checksum_table(text: str) -> dict[str, tuple[int, str]]:
    """{relative path: (bytes, md5)} from the rows under the README's `## Checksums` heading."""
    section = text.split("\n## Checksums\n", 1)
    assert len(section) == 2, f"{README} has no '## Checksums' section"
    body = section[1].split("\n## ", 1)[0]
    table: dict[str, tuple[int, str]] = {}
    for line in body.splitlines():
        match = ROW.match(line)
        if match:
            path, size, md5 = match.groups()
            assert path not in table, f"{path} has two rows in {README}"
            table[path] = (int(size.replace(",", "")), md5)
    return table


def shipped_files() -> list[str]:
    return sorted(p.relative_to(EVAL).as_posix() for p in EVAL.rglob("*") if p.is_file() and p != README)


def md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def test_checksum_table_parses_its_rows_only():
    text = "# t\n| `x` | 1 | 2 |\n## Checksums\n| file | bytes | md5 |\n|---|---|---|\n" \
           f"| `a/b.tsv` | 1,024 | `{'0' * 32}` |\n## Next\n| `c` | 5 | `{'1' * 32}` |\n"
    assert checksum_table(text) == {"a/b.tsv": (1024, "0" * 32)}
    with pytest.raises(AssertionError, match="two rows"):
        checksum_table(text.replace("## Next", f"| `a/b.tsv` | 3 | `{'2' * 32}` |\n## Next"))


def test_every_shipped_file_has_a_row_and_every_row_a_file():
    table = checksum_table(README.read_text(encoding="utf-8"))
    files = shipped_files()
    assert files, f"no files under {EVAL}"
    assert not (missing := [f for f in files if f not in table]), f"not in {README}'s checksum table: {missing}"
    assert not (gone := sorted(set(table) - set(files))), f"in {README}'s checksum table but not shipped: {gone}"


def test_every_shipped_file_matches_its_md5_and_size():
    table = checksum_table(README.read_text(encoding="utf-8"))
    wrong = []
    for name in shipped_files():
        if name not in table:
            continue  # reported by the test above
        size, expected = table[name]
        actual = ((EVAL / name).stat().st_size, md5(EVAL / name))
        if actual != (size, expected):
            wrong.append(f"{name}: {actual[0]} bytes, md5 {actual[1]}; the table says {size}, {expected}")
    assert not wrong, "data/eval files differ from the checksum table:\n" + "\n".join(wrong)
