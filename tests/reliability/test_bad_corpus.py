"""Bad corpus input, fuzzed with hypothesis: never an unhandled exception.

Corpora are built from records that are each good or bad in one way: random bytes, invalid UTF-8,
NUL bytes, over-long lines, JSON of the wrong type or shape, ragged CSV rows, the same id with a
different text, blank lines, empty files. For every corpus, in each format:
- `on_error: fail` either ingests or raises `IngestError` naming the file (and the line, for a bad
  record) and the kind;
- `on_error: skip` either ingests, with every skipped record counted in the report and listed, or
  raises `IngestError` only because nothing is left;
- the two modes agree: fail succeeds exactly when skip skips nothing, and fail stops at the first
  record that skip lists.
tests/test_ingest.py has one fixed example of each kind and seeded byte mutations; this adds mixed,
generated corpora, the agreement between the modes, the report arithmetic and the stage itself.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.ingest import ERROR_KINDS, IngestError, ingest_corpus
from pipeline.params import CorpusParams

LIMIT = 2048  # max_record_bytes in the fuzz: over-long records stay cheap to generate
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FILE_LEVEL = {"unreadable", "empty_file", "no_passages"}
WORDS = st.lists(st.sampled_from(["rivers", "carry", "sand", "to", "the", "sea", "caf\u00e9", "\u6c34", "a"]), min_size=0, max_size=14)
TEXT = WORDS.map(" ".join)
IDS = st.sampled_from(["d1", "d2", "d3", "d4", "d5"])  # few ids: duplicates (same or other text) are common
ODD = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.lists(st.integers(), max_size=2),
                st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))  # fmt: skip


def jsonl_record():
    good = st.fixed_dictionaries({"_id": IDS, "title": TEXT, "text": TEXT}).map(lambda r: json.dumps(r).encode())
    wrong_types = st.fixed_dictionaries(
        {"_id": st.one_of(IDS, ODD), "title": st.one_of(TEXT, ODD), "text": st.one_of(TEXT, ODD)}
    ).map(lambda r: json.dumps(r).encode())
    missing = st.fixed_dictionaries({}, optional={"_id": IDS, "title": TEXT, "text": TEXT}).map(lambda r: json.dumps(r).encode())
    return st.one_of(
        good, good, wrong_types, missing,
        st.binary(max_size=60).map(lambda b: b.replace(b"\n", b" ")),  # random bytes
        good.map(lambda b: b[: len(b) // 2] + b"\xff\xfe" + b[len(b) // 2 :]),  # invalid UTF-8
        good.map(lambda b: b.replace(b'"text": "', b'"text": "\x00', 1)),  # raw NUL
        good.map(lambda b: b.replace(b'"text": "', b'"text": "\\u0000 ', 1)),  # escaped NUL
        good.map(lambda b: b.replace(b'"text": "', b'"text": "\\udc80 ', 1)),  # lone surrogate
        st.just(b'{"_id": "d9", "text": "' + b"x " * LIMIT + b'"}'),  # over-long line
        st.sampled_from([b"", b"   ", b"[1, 2]", b"null", b'"text"', b"{", b"[" * 5000]),  # blank / not an object
        good.map(lambda b: b[:-1]), st.text(max_size=30).map(str.encode),  # malformed JSON, valid UTF-8
    )  # fmt: skip


def csv_row():
    field = st.one_of(TEXT, IDS, st.text(max_size=12), st.just('"'), st.just('a "b" c'), st.just("x\x00y"))
    good = st.tuples(IDS, TEXT, TEXT).map(lambda r: ",".join(f'"{v}"' for v in r).encode())
    return st.one_of(
        good, good,
        st.lists(field, min_size=0, max_size=5).map(lambda fs: ",".join(fs).encode("utf-8", "surrogatepass")),  # ragged
        st.binary(max_size=40).map(lambda b: b.replace(b"\n", b" ")),
        good.map(lambda b: b + b"\xc3"),  # a truncated UTF-8 sequence
        st.just(b'd9,t,"' + b"y" * (LIMIT + 10) + b'"'),  # over-long field
    )  # fmt: skip


def text_file():
    return st.one_of(
        TEXT.map(str.encode), st.binary(max_size=80), st.just(b""), st.just(b"\n\n"),
        TEXT.map(lambda t: b"# Title\n\n" + t.encode() + b"\x00"), TEXT.map(lambda t: t.encode() + b"\xe9 more"),
        st.just(b"w " * (LIMIT // 2 + 1)),
    )  # fmt: skip


@st.composite
def corpora(draw):
    """(format, {relative file name: bytes}, corpus path relative to the root)."""
    fmt = draw(st.sampled_from(["jsonl", "csv", "text_dir", "parquet_junk"]))
    if fmt == "jsonl":
        lines = draw(st.lists(jsonl_record(), max_size=8))
        return fmt, {"c.jsonl": b"\n".join(lines) + draw(st.sampled_from([b"", b"\n"]))}, "c.jsonl"
    if fmt == "csv":
        header = draw(st.sampled_from([b"_id,title,text", b"_id,text", b"text,_id,title,extra", b"id,body", b""]))
        rows = draw(st.lists(csv_row(), max_size=8))
        return fmt, {"c.csv": b"\n".join([header, *rows]) + b"\n"}, "c.csv"
    if fmt == "text_dir":
        files = draw(st.lists(text_file(), min_size=1, max_size=4))
        names = [f"d/{i}.{'md' if i % 2 else 'txt'}" for i in range(len(files))]
        return fmt, dict(zip(names, files)), "d"
    return fmt, {"c.parquet": b"PAR1" + draw(st.binary(max_size=64))}, "c.parquet"


def ingest(root: Path, corpus: str, mode: str):
    try:
        return ingest_corpus(CorpusParams(path=Path(corpus), on_error=mode), root, max_record_bytes=LIMIT), None
    except IngestError as err:
        return None, err


def check_passages(result) -> None:
    rows = result.passages.to_pylist()
    assert len({r["passage_id"] for r in rows}) == len(rows)
    for r in rows:
        for value in (r["passage_id"], r["doc_id"], r["title"], r["text"]):
            assert "\x00" not in value
            value.encode("utf-8")  # storable: no lone surrogate, no smuggled byte


@SETTINGS
@given(corpora())
def test_fuzzed_corpus_is_ingested_or_refused_clearly(case):
    fmt, files, corpus = case
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)
        failed, fail_err = ingest(root, corpus, "fail")  # anything but IngestError escapes and fails the test
        skipped, skip_err = ingest(root, corpus, "skip")

    if fail_err is not None:
        assert fail_err.file in files or fail_err.file == corpus, str(fail_err)
        assert fail_err.kind in ERROR_KINDS or fail_err.kind == "no_passages"
        if fail_err.kind not in FILE_LEVEL and fmt != "text_dir":
            n_lines = files[fail_err.file].count(b"\n") + 1
            assert fail_err.line is not None and 1 <= fail_err.line <= n_lines, str(fail_err)
        where = f"{fail_err.file}:{fail_err.line}" if fail_err.line is not None else fail_err.file
        assert str(fail_err).startswith(f"{where}: {fail_err.kind}: ")

    if skip_err is not None:
        assert skip_err.kind == "no_passages", f"skip mode raised {skip_err}"
    else:
        check_passages(skipped)
        report = skipped.report
        assert report["errors"] == len(skipped.errors) == sum(report[k] for k in ERROR_KINDS)
        for e in skipped.errors:
            assert e.kind in ERROR_KINDS and e.file in files
        # A text file is one record, even an empty one; in JSONL and Parquet a record error has a line.
        record_errors = sum(1 for e in skipped.errors if fmt == "text_dir" or e.line is not None)
        assert report["records_read"] >= report["documents"] + report["duplicate_docs"]
        assert report["records_read"] == report["documents"] + report["duplicate_docs"] + record_errors or fmt == "csv"
        assert report["passages"] == skipped.passages.num_rows

    # The two modes agree.
    if failed is not None:
        check_passages(failed)
        assert skip_err is None and skipped.errors == [] and skipped.passages.equals(failed.passages)
    elif fail_err.kind != "no_passages":
        first = skipped.errors[0] if skip_err is None else None
        if first is not None:
            assert (first.file, first.line, first.kind) == (fail_err.file, fail_err.line, fail_err.kind)
        else:  # nothing left in skip mode: its message names the first skipped record
            assert fail_err.file in str(skip_err)


HUGE = 10 * 1024 * 1024


@pytest.mark.parametrize("case", ["txt", "jsonl-last-line-no-newline", "jsonl-random-bytes", "csv-unquoted"])
def test_ten_megabyte_records_are_refused_by_line_and_the_rest_kept(case, tmp_path):
    good = b'{"_id": "ok", "text": "rivers carry sand to the sea"}'
    if case == "txt":
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "big.txt").write_bytes(b"word " * (HUGE // 5 + 1))
        (tmp_path / "d" / "ok.txt").write_bytes(b"rivers carry sand to the sea")
        corpus, file, line = "d", "d/big.txt", None
    elif case == "jsonl-last-line-no-newline":
        (tmp_path / "c.jsonl").write_bytes(good + b'\n{"_id": "x", "text": "' + b"y" * HUGE + b'"}')
        corpus, file, line = "c.jsonl", "c.jsonl", 2
    elif case == "jsonl-random-bytes":
        import random

        blob = bytes(random.Random(1).getrandbits(8) for _ in range(HUGE // 64)) * 64
        (tmp_path / "c.jsonl").write_bytes(blob.replace(b"\n", b" ") + b"\n" + good + b"\n")
        corpus, file, line = "c.jsonl", "c.jsonl", 1
    else:
        (tmp_path / "c.csv").write_bytes(b"_id,text\nx," + b"z" * HUGE + b"\nok,rivers carry sand to the sea\n")
        corpus, file, line = "c.csv", "c.csv", 2
    with pytest.raises(IngestError) as info:
        ingest_corpus(CorpusParams(path=Path(corpus)), tmp_path)
    assert (info.value.file, info.value.line, info.value.kind) == (file, line, "too_long")
    result = ingest_corpus(CorpusParams(path=Path(corpus), on_error="skip"), tmp_path)
    assert result.report["too_long"] == 1 and result.passages.column("text").to_pylist() == ["rivers carry sand to the sea"]


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_passages_stage_on_a_bad_corpus(mode, tmp_path, monkeypatch, capsys):
    """The stage: fail names file:line:kind and leaves warehouse/ untouched; skip writes the counts."""
    import duckdb

    from python_steps import passages as stage

    monkeypatch.chdir(tmp_path)
    Path("c.jsonl").write_bytes(
        b'{"_id": "a", "text": "rivers carry sand to the sea"}\n{"_id": "b", "text": 7}\n\xff\xfe\n'
        b'{"_id": "a", "text": "a different text for the same id"}\n'
    )
    Path("params.yaml").write_text(f"corpus: {{path: c.jsonl, on_error: {mode}}}\n")
    if mode == "fail":
        with pytest.raises(SystemExit, match=r"passages: c.jsonl:2: wrong_type: text must be a string"):
            stage.main()
        assert not Path("warehouse/passages.duckdb").exists()
        return
    stage.main()
    con = duckdb.connect("warehouse/passages.duckdb", read_only=True)
    report = dict(con.execute("SELECT metric, count FROM ingest_report").fetchall())
    errors = con.execute("SELECT line, kind FROM ingest_errors ORDER BY line").fetchall()
    assert con.execute("SELECT count(*) FROM passages").fetchone()[0] == 1
    con.close()
    assert errors == [(2, "wrong_type"), (3, "undecodable"), (4, "duplicate_id")]
    assert report["errors"] == 3 and report["records_read"] == 4 and report["documents"] == 1
