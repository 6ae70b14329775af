"""pipeline.ingest: every input format, every kind of bad record, splitting, normalisation, dedup, ids."""

from __future__ import annotations

import csv
import json
import random
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.ingest import (
    ERROR_KINDS,
    IngestError,
    IngestResult,
    corpus_files,
    detect_format,
    ingest_corpus,
    normalize_text,
    split_words,
)
from pipeline.params import CorpusParams

SCIFACT = Path(__file__).resolve().parents[1] / "data/eval/scifact/corpus.jsonl"
GOOD = "alpha beta gamma delta epsilon zeta"  # six words: above the default min_words of 5


def words(n: int, prefix: str = "w") -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def jsonl(*records: object) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def ingest(tmp_path: Path, name: str, content: bytes | str | None = None, **params: object) -> IngestResult:
    """Write `content` to tmp_path/name (unless None) and ingest it with `params`, root tmp_path."""
    target = tmp_path / name
    if content is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content.encode() if isinstance(content, str) else content)
    return ingest_corpus(CorpusParams(path=Path(name), **params), tmp_path)


def rows(result: IngestResult) -> list[dict]:
    return result.passages.to_pylist()


# --- formats -------------------------------------------------------------------------------------


def test_beir_jsonl_gives_passages_with_source_lines(tmp_path: Path) -> None:
    data = jsonl(
        {"_id": "d1", "title": "First", "text": GOOD, "metadata": {}},
        {"_id": 7, "title": None, "text": "one two three four five six seven"},
    )
    result = ingest(tmp_path, "corpus.jsonl", data)
    assert rows(result) == [
        {"passage_id": "d1#0", "doc_id": "d1", "title": "First", "text": GOOD, "n_words": 6, "source": "corpus.jsonl:1"},
        {
            "passage_id": "7#0",
            "doc_id": "7",
            "title": "",
            "text": "one two three four five six seven",
            "n_words": 7,
            "source": "corpus.jsonl:2",
        },
    ]
    assert result.report["documents"] == 2 and result.report["errors"] == 0
    assert result.passages.schema.field("n_words").type == pa.int32()


def test_jsonl_with_custom_field_names_and_no_title(tmp_path: Path) -> None:
    data = jsonl({"doc": "a", "heading": "ignored", "body": GOOD})
    result = ingest(tmp_path, "c.jsonl", data, id_field="doc", text_field="body", title_field=None)
    assert [(r["doc_id"], r["title"], r["text"]) for r in rows(result)] == [("a", "", GOOD)]


def test_json_extension_is_read_as_jsonl(tmp_path: Path) -> None:
    assert rows(ingest(tmp_path, "c.json", jsonl({"_id": "a", "text": GOOD})))[0]["doc_id"] == "a"


def test_csv_with_multiline_quoted_field_reports_record_start_line(tmp_path: Path) -> None:
    content = f'_id,title,text\na,T,"{GOOD}"\nb,,"line one\nline two three four five"\nc,X,{GOOD} more\n'
    result = ingest(tmp_path, "c.csv", content)
    assert [(r["doc_id"], r["title"], r["text"], r["source"]) for r in rows(result)] == [
        ("a", "T", GOOD, "c.csv:2"),
        ("b", "", "line one line two three four five", "c.csv:3"),
        ("c", "X", GOOD + " more", "c.csv:5"),
    ]


def test_csv_with_bom_and_renamed_columns(tmp_path: Path) -> None:
    content = "\ufeffid,body\nx," + GOOD + "\n"
    result = ingest(tmp_path, "c.csv", content, id_field="id", text_field="body")
    assert rows(result)[0]["doc_id"] == "x"


def test_parquet_with_integer_ids_and_row_numbers(tmp_path: Path) -> None:
    table = pa.table({"_id": [10, 11], "title": ["A", None], "text": [GOOD, GOOD + " again"]})
    pq.write_table(table, tmp_path / "c.parquet")
    result = ingest(tmp_path, "c.parquet")
    assert [(r["passage_id"], r["title"], r["source"]) for r in rows(result)] == [
        ("10#0", "A", "c.parquet:1"),
        ("11#0", "", "c.parquet:2"),
    ]


def test_text_dir_reads_txt_and_md_recursively_in_path_order(tmp_path: Path) -> None:
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text(GOOD + "\n\nsecond paragraph here", encoding="utf-8")
    (d / "sub" / "a.md").write_text(f"# The Heading\n\n{GOOD}\n", encoding="utf-8")
    (d / "notes.pdf").write_bytes(b"%PDF not text")  # other extensions are not corpus files
    (d / ".hidden").mkdir()
    (d / ".hidden" / "x.txt").write_text(GOOD + " hidden", encoding="utf-8")
    result = ingest(tmp_path, "docs")
    assert [(r["doc_id"], r["title"], r["text"], r["source"]) for r in rows(result)] == [
        ("b.txt", "", GOOD + " second paragraph here", "docs/b.txt"),
        ("sub/a.md", "The Heading", GOOD, "docs/sub/a.md"),
    ]
    assert result.report["files"] == 2


def test_folder_of_jsonl_shards_with_explicit_format(tmp_path: Path) -> None:
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "part-2.jsonl").write_bytes(jsonl({"_id": "b", "text": GOOD + " b"}))
    (tmp_path / "shards" / "part-1.jsonl").write_bytes(jsonl({"_id": "a", "text": GOOD + " a"}))
    result = ingest(tmp_path, "shards", format="jsonl")
    assert [r["source"] for r in rows(result)] == ["shards/part-1.jsonl:1", "shards/part-2.jsonl:1"]


def test_detect_format_by_extension_and_unknown_extension_is_an_ingest_error(tmp_path: Path) -> None:
    assert detect_format(tmp_path / "x.JSONL") == "jsonl"
    assert detect_format(tmp_path / "x.parquet") == "parquet"
    assert detect_format(tmp_path) == "text_dir"
    assert detect_format(tmp_path / "x.tsv", "csv") == "csv"
    with pytest.raises(IngestError, match="corpus.format"):
        detect_format(tmp_path / "x.tsv")


def test_missing_corpus_and_folder_without_matching_files_raise_ingest_error(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="not found"):
        ingest(tmp_path, "nope.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match=r"no \*\.txt/\*\.md files"):
        corpus_files(tmp_path / "empty", "text_dir")


# --- bad input: each case is (file name, content, kind, line of the error) ------------------------

ok_line = json.dumps({"_id": "ok", "text": GOOD}).encode()
BAD_INPUTS = {
    "jsonl-non-utf8": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": "caf\xe9 au lait"}\n', "undecodable", 2),
    "jsonl-malformed": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": \n', "malformed", 2),
    "jsonl-not-object": ("c.jsonl", ok_line + b"\n[1, 2]\n", "malformed", 2),
    "jsonl-deep-nesting": ("c.jsonl", ok_line + b"\n" + b"[" * 200_000 + b"\n", "malformed", 2),
    "jsonl-missing-text": ("c.jsonl", ok_line + b'\n{"_id": "x", "title": "t"}\n', "missing_text", 2),
    "jsonl-null-text": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": null}\n', "missing_text", 2),
    "jsonl-missing-id": ("c.jsonl", ok_line + b'\n{"text": "a b c d e f"}\n', "missing_id", 2),
    "jsonl-text-number": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": 42}\n', "wrong_type", 2),
    "jsonl-text-list": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": ["a", "b"]}\n', "wrong_type", 2),
    "jsonl-title-dict": ("c.jsonl", ok_line + b'\n{"_id": "x", "title": {}, "text": "a b c d e"}\n', "wrong_type", 2),
    "jsonl-id-float": ("c.jsonl", ok_line + b'\n{"_id": 1.5, "text": "a b c d e"}\n', "wrong_type", 2),
    "jsonl-id-bool": ("c.jsonl", ok_line + b'\n{"_id": true, "text": "a b c d e"}\n', "wrong_type", 2),
    "jsonl-raw-nul": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": "a\x00b"}\n', "nul_byte", 2),
    "jsonl-escaped-nul": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": "a \\u0000 b c d e"}\n', "nul_byte", 2),
    "jsonl-lone-surrogate": ("c.jsonl", ok_line + b'\n{"_id": "x", "text": "a \\ud800 b c d e"}\n', "undecodable", 2),
    "jsonl-duplicate-id": (
        "c.jsonl",
        ok_line + b"\n" + json.dumps({"_id": "ok", "text": GOOD + " changed"}).encode() + b"\n",
        "duplicate_id",
        2,
    ),
    "jsonl-huge-line": (
        "c.jsonl",
        ok_line + b'\n{"_id": "x", "text": "' + b"y" * 10_000_000 + b'"}\n' + ok_line.replace(b'"ok"', b'"ok2"'),
        "too_long",
        2,
    ),
    "csv-ragged": ("c.csv", f"_id,text\nok,{GOOD}\nx,a b c d e,extra\n", "ragged_row", 3),
    "csv-non-utf8": ("c.csv", f"_id,text\nok,{GOOD}\n".encode() + b"x,caf\xe9 a b c d\n", "undecodable", 3),
    "csv-nul": ("c.csv", f"_id,text\nok,{GOOD}\nx,a\x00b c d e f\n", "nul_byte", 3),
    "csv-broken-quote": ("c.csv", f'_id,text\nok,{GOOD}\nx,"a b"c d e\n', "malformed", 3),
    "csv-unterminated-quote": ("c.csv", f'_id,text\nok,{GOOD}\nx,"a b c d e\n', "malformed", 3),
    "csv-huge-field": ("c.csv", f"_id,text\nok,{GOOD}\nx," + "z" * 10_000_000 + "\n", "too_long", 3),
    "text-non-utf8": ("d/a.txt", b"fine line\nbad \xff byte here\n", "undecodable", 2),
    "text-nul": ("d/a.txt", b"one\ntwo\nthree\x00\n", "nul_byte", 3),
}


def _write_bad(tmp_path: Path, name: str, content: bytes | str) -> tuple[Path, str]:
    """Write the bad file (text files go beside a good one); returns the corpus path and the bad file's label."""
    target = tmp_path / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(content.encode() if isinstance(content, str) else content)
    if name.startswith("d/"):
        (tmp_path / "d" / "good.txt").write_text(GOOD, encoding="utf-8")
        return Path("d"), name
    return Path(name), name


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_fails_naming_file_line_and_kind(tmp_path: Path, case: str) -> None:
    name, content, kind, line = BAD_INPUTS[case]
    corpus, label = _write_bad(tmp_path, name, content)
    with pytest.raises(IngestError) as info:
        ingest_corpus(CorpusParams(path=corpus), tmp_path)
    err = info.value
    assert (err.file, err.line, err.kind) == (label, line, kind)
    assert str(err).startswith(f"{label}:{line}: {kind}: ")


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_is_skipped_counted_and_listed(tmp_path: Path, case: str) -> None:
    name, content, kind, line = BAD_INPUTS[case]
    corpus, label = _write_bad(tmp_path, name, content)
    result = ingest_corpus(CorpusParams(path=corpus, on_error="skip"), tmp_path)
    assert result.report[kind] == 1 and result.report["errors"] == 1
    assert [(e.file, e.line, e.kind) for e in result.errors] == [(label, line, kind)]
    assert result.errors_table().to_pylist()[0]["line"] == line
    # The good record beside the bad one still arrives.
    assert [r["text"] for r in rows(result)][:1] == [GOOD]


def test_csv_header_without_the_text_column_skips_the_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.csv").write_text(f"_id,body\nx,{GOOD}\n", encoding="utf-8")
    with pytest.raises(IngestError) as info:
        ingest_corpus(CorpusParams(path=Path("d/a.csv")), tmp_path)
    assert (info.value.file, info.value.line, info.value.kind) == ("d/a.csv", 1, "missing_text")
    assert "no column 'text'" in str(info.value)
    (tmp_path / "d" / "b.csv").write_text(f"_id,text\ny,{GOOD}\n", encoding="utf-8")
    result = ingest_corpus(CorpusParams(path=Path("d"), format="csv", on_error="skip"), tmp_path)
    assert [r["doc_id"] for r in rows(result)] == ["y"] and result.report["missing_text"] == 1


def test_empty_files_are_errors_in_every_format(tmp_path: Path) -> None:
    pq.write_table(pa.table({"_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    for name, content in [("e.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("e.csv", b""), ("h.csv", b"_id,text\n")]:
        (tmp_path / name).write_bytes(content)
    for name in ("e.jsonl", "blank.jsonl", "e.csv", "h.csv", "e.parquet"):
        with pytest.raises(IngestError) as info:
            ingest_corpus(CorpusParams(path=Path(name)), tmp_path)
        assert (info.value.file, info.value.kind) == (name, "empty_file")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "empty.md").write_bytes(b"")
    (tmp_path / "d" / "good.md").write_text(GOOD, encoding="utf-8")
    result = ingest_corpus(CorpusParams(path=Path("d"), on_error="skip"), tmp_path)
    assert result.report["empty_file"] == 1 and result.passages.num_rows == 1


def test_parquet_bad_columns_and_files(tmp_path: Path) -> None:
    pq.write_table(pa.table({"_id": ["a"], "text": [3]}), tmp_path / "int_text.parquet")
    pq.write_table(pa.table({"_id": ["a", "b"], "text": [GOOD, None]}), tmp_path / "null_text.parquet")
    (tmp_path / "fake.parquet").write_bytes(b"PAR1 this is not parquet")
    # Arrow can hold unvalidated bytes in a string column; the bad row must be named, not the batch lost.
    latin1 = pa.array([GOOD.encode(), b"caf\xe9 a b c d e"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"_id": ["a", "b"], "text": latin1}), tmp_path / "latin1.parquet")
    cases = [
        ("int_text.parquet", None, "wrong_type"),
        ("null_text.parquet", 2, "missing_text"),
        ("fake.parquet", None, "unreadable"),
        ("latin1.parquet", 2, "undecodable"),
    ]
    for name, line, kind in cases:
        with pytest.raises(IngestError) as info:
            ingest_corpus(CorpusParams(path=Path(name)), tmp_path)
        assert (info.value.file, info.value.line, info.value.kind) == (name, line, kind)


def test_random_corruption_only_ever_raises_ingest_error(tmp_path: Path) -> None:
    """Seeded byte mutations of valid files: each run ends in a result or an IngestError, never another type."""
    rng = random.Random(7)
    originals = {
        "jsonl": jsonl(*({"_id": f"d{i}", "title": "T\u00e9", "text": f"{GOOD} {i}"} for i in range(10))),
        "csv": b"_id,title,text\n" + b"".join(f'd{i},T,"{GOOD}, {i}"\n'.encode() for i in range(10)),
        "md": f"# Head\n\n{GOOD}\n".encode(),
    }
    for ext, original in originals.items():
        for _ in range(60):
            data = bytearray(original)
            for _ in range(rng.randint(1, 5)):
                at = rng.randrange(len(data))
                data[at : at + rng.randint(0, 3)] = rng.choice([b'"', b"\n", b",", b"\x00", b"\xff", b"{", b"\\u", b""])
            (tmp_path / f"x.{ext}").write_bytes(bytes(data))
            for mode in ("fail", "skip"):
                try:
                    ingest_corpus(CorpusParams(path=Path(f"x.{ext}"), on_error=mode), tmp_path)
                except IngestError:
                    pass


def test_same_document_twice_is_a_harmless_duplicate_not_an_error(tmp_path: Path) -> None:
    record = {"_id": "a", "title": "T", "text": GOOD}
    result = ingest(tmp_path, "c.jsonl", jsonl(record, {**record, "text": "  " + GOOD.replace(" ", "\n")}))
    assert result.report["duplicate_docs"] == 1 and result.report["errors"] == 0
    assert result.passages.num_rows == 1


def test_skip_mode_counts_add_up(tmp_path: Path) -> None:
    data = jsonl(
        {"_id": "a", "text": GOOD},
        b"",  # blank line: counted apart, not a record
        b"{broken",
        {"_id": "b", "text": 5},
        {"_id": "a", "text": GOOD},  # harmless repeat
        {"_id": "c", "text": "too short"},
    )
    result = ingest(tmp_path, "c.jsonl", data, on_error="skip")
    r = result.report
    assert r["blank_lines"] == 1 and r["records_read"] == 5
    assert r["records_read"] == r["documents"] + r["duplicate_docs"] + sum(r[k] for k in ERROR_KINDS)
    assert (r["documents"], r["dropped_short"], r["passages"], r["errors"]) == (2, 1, 1, 2)
    assert result.report_table().column_names == ["metric", "count"]


def test_nothing_left_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="no passages left.*not valid JSON"):
        ingest(tmp_path, "c.jsonl", b"{bad\n", on_error="skip")


def test_csv_field_size_limit_is_restored(tmp_path: Path) -> None:
    before = csv.field_size_limit()
    ingest(tmp_path, "c.csv", f"_id,text\na,{GOOD}\n")
    assert csv.field_size_limit() == before


# --- splitting, normalisation, dedup, ids ----------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "max_words", "overlap", "expected"),
    [
        (0, 10, 2, [(0, 0)]),
        (10, 10, 2, [(0, 10)]),
        (11, 10, 2, [(0, 10), (8, 11)]),
        (26, 10, 2, [(0, 10), (8, 18), (16, 26)]),
        (27, 10, 2, [(0, 10), (8, 18), (16, 26), (24, 27)]),
        (600, 256, 32, [(0, 256), (224, 480), (448, 600)]),
        (25, 10, 0, [(0, 10), (10, 20), (20, 25)]),
    ],
)
def test_split_words_windows(n: int, max_words: int, overlap: int, expected: list[tuple[int, int]]) -> None:
    windows = split_words(n, max_words, overlap)
    assert windows == expected
    # Every word is covered, consecutive windows share exactly `overlap` words.
    assert windows[0][0] == 0 and windows[-1][1] == n
    assert all(b[0] == a[1] - overlap for a, b in zip(windows, windows[1:]))


def test_split_words_rejects_overlap_not_below_max() -> None:
    with pytest.raises(ValueError, match="overlap_words"):
        split_words(5, 4, 4)


def test_long_document_is_cut_with_overlap_and_short_tail_dropped(tmp_path: Path) -> None:
    result = ingest(tmp_path, "c.jsonl", jsonl({"_id": "d", "text": words(27)}), max_words=10, overlap_words=2, min_words=5)
    got = rows(result)
    assert [r["passage_id"] for r in got] == ["d#0", "d#1", "d#2"]  # d#3 (words 24-26) is 3 words: dropped
    assert [r["n_words"] for r in got] == [10, 10, 10]
    assert got[1]["text"].split()[:2] == got[0]["text"].split()[-2:]
    assert got[2]["text"] == " ".join(f"w{i}" for i in range(16, 26))
    assert (result.report["docs_split"], result.report["passages_cut"], result.report["dropped_short"]) == (1, 4, 1)


def test_short_documents_are_dropped_and_counted(tmp_path: Path) -> None:
    data = jsonl({"_id": "a", "text": "four words only here"}, {"_id": "b", "text": "five words are just enough"}, {"_id": "e", "text": ""})
    result = ingest(tmp_path, "c.jsonl", data, min_words=5)
    assert [r["doc_id"] for r in rows(result)] == ["b"]
    assert result.report["dropped_short"] == 2


def test_normalize_text_nfc_and_whitespace() -> None:
    assert normalize_text("Cafe\u0301 \t crème\n\n\u00a0brûlée\u2003 ") == "Caf\u00e9 crème brûlée"
    assert normalize_text("  plain   ascii\r\n") == "plain ascii"
    assert normalize_text("") == ""


def test_duplicates_after_normalisation_are_removed_across_documents(tmp_path: Path) -> None:
    data = jsonl(
        {"_id": "a", "title": "A", "text": "Cafe\u0301 one two three four"},
        {"_id": "b", "title": "B", "text": "  Caf\u00e9\tone two\nthree   four "},
        {"_id": "c", "title": "C", "text": "café one two three four"},  # lower case differs: kept
    )
    result = ingest(tmp_path, "c.jsonl", data)
    assert [(r["passage_id"], r["text"]) for r in rows(result)] == [
        ("a#0", "Caf\u00e9 one two three four"),
        ("c#0", "café one two three four"),
    ]
    assert result.report["duplicates"] == 1


def test_passage_ids_are_stable_and_unique(tmp_path: Path) -> None:
    docs = [{"_id": f"d{i}", "text": words(30 + i, prefix=f"d{i}w")} for i in range(5)]
    first = ingest(tmp_path, "c.jsonl", jsonl(*docs), max_words=12, overlap_words=3)
    again = ingest(tmp_path, "c.jsonl", max_words=12, overlap_words=3)
    assert first.passages.equals(again.passages)
    ids = first.passages.column("passage_id").to_pylist()
    assert len(ids) == len(set(ids))
    # Ids depend on the document, not on its position: another document in front changes none.
    moved = ingest(tmp_path, "c.jsonl", jsonl({"_id": "new", "text": words(40, "n")}, *docs), max_words=12, overlap_words=3)
    by_text = {r["text"]: r["passage_id"] for r in rows(moved)}
    assert all(by_text[r["text"]] == r["passage_id"] for r in rows(first))


@pytest.mark.slow
def test_full_scifact_ingests_in_seconds() -> None:
    started = time.perf_counter()
    result = ingest_corpus(CorpusParams(path=SCIFACT), Path("."))
    seconds = time.perf_counter() - started
    assert result.report["documents"] == 5183 and result.report["errors"] == 0
    assert result.passages.num_rows == result.report["passages"] == 6247
    assert seconds < 10, f"full SciFact took {seconds:.1f} s"
