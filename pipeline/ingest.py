"""Read a corpus into passages: the library behind the `passages` stage.

Input is BEIR JSONL (`_id`, `title`, `text`), JSONL/CSV/Parquet with other field names, or a folder
of `.txt`/`.md` files (one document each). Every document is normalised (Unicode NFC, runs of
whitespace to one space), cut into windows of `max_words` words that overlap by `overlap_words`,
and windows under `min_words` words or whose text was already seen are dropped.

Bad input never passes silently: each bad record is an `IngestError` naming file, line and kind
(`on_error: fail`, the default), or is skipped, counted in the report and listed in the errors
(`on_error: skip`). Work happens in plain Python per record and ends in one Arrow table, so the
stage writes it to DuckDB in a single statement.
"""

from __future__ import annotations

import csv
import json
import time
import unicodedata
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.params import CorpusParams

if TYPE_CHECKING:
    import pyarrow as pa

# A record (JSONL line, CSV field, Parquet value, text file) above this size is refused: one that big
# is nearly always a broken file (a whole corpus on one line, a binary blob), and reading it unbounded
# could exhaust memory. 8 MiB still fits a long book (War and Peace is 3.2 MB).
MAX_RECORD_BYTES = 8 * 1024 * 1024

# Kinds of bad record, in the order the report lists them.
ERROR_KINDS = (
    "unreadable",  # the file cannot be opened or read (permissions, I/O error, not Parquet)
    "empty_file",  # no records at all
    "undecodable",  # bytes that are not UTF-8 (or a JSON string with a lone surrogate)
    "nul_byte",  # a NUL character: almost always a binary file read as text
    "too_long",  # a record over MAX_RECORD_BYTES
    "malformed",  # not valid JSON / not a JSON object / broken CSV quoting
    "ragged_row",  # a CSV row with more or fewer fields than the header
    "missing_id",  # id field absent, null or empty
    "missing_text",  # text field absent or null (an empty string is a short passage, not an error)
    "wrong_type",  # e.g. text is a number or a list, id is a float
    "duplicate_id",  # the same doc id again with a different title or text
)

# Counts in the report, in order. records_read = documents + duplicate_docs + record-level errors.
REPORT_METRICS = (
    "files",
    "records_read",
    "blank_lines",
    "documents",
    "duplicate_docs",  # the same doc id with the same title and text again: harmless, dropped
    "docs_split",  # documents longer than max_words, cut into several passages
    "passages_cut",
    "dropped_short",
    "duplicates",  # passages whose normalised text equals an earlier passage's
    "passages",
    *ERROR_KINDS,
    "errors",
)

_FORMAT_BY_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text_dir",
    ".md": "text_dir",
}
_SUFFIXES = {
    "jsonl": (".jsonl", ".json"),
    "csv": (".csv",),
    "parquet": (".parquet", ".pq"),
    "text_dir": (".txt", ".md"),
}
_MISSING = object()  # a field absent from the record, told apart from an explicit null


class IngestError(ValueError):
    """A corpus record or file that cannot be ingested; the message names file, line and kind."""

    def __init__(self, file: str, line: int | None, kind: str, message: str) -> None:
        self.file, self.line, self.kind, self.message = file, line, kind, message
        where = f"{file}:{line}" if line is not None else file
        super().__init__(f"{where}: {kind}: {message}")


@dataclass(frozen=True)
class RecordError:
    """One skipped record (or file, when `line` is None)."""

    file: str
    line: int | None
    kind: str
    message: str


@dataclass(frozen=True)
class Document:
    doc_id: str
    title: str
    text: str
    file: str
    line: int | None

    @property
    def source(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file


@dataclass
class IngestResult:
    """Passages as an Arrow table, the report counts, and every skipped record."""

    passages: pa.Table
    report: dict[str, int]
    errors: list[RecordError]
    seconds: float
    input_bytes: int

    def report_table(self) -> pa.Table:
        import pyarrow as pa

        return pa.table(
            {"metric": list(self.report), "count": list(self.report.values())},
            schema=pa.schema([("metric", pa.string()), ("count", pa.int64())]),
        )

    def errors_table(self) -> pa.Table:
        import pyarrow as pa

        return pa.table(
            {
                "file": [e.file for e in self.errors],
                "line": [e.line for e in self.errors],
                "kind": [e.kind for e in self.errors],
                "message": [e.message for e in self.errors],
            },
            schema=pa.schema(
                [("file", pa.string()), ("line", pa.int64()), ("kind", pa.string()), ("message", pa.string())]
            ),
        )


@dataclass
class _Sink:
    """Where readers send bad records: raised at once (`fail`) or kept and counted (`skip`)."""

    on_error: str
    counts: Counter = field(default_factory=Counter)
    errors: list[RecordError] = field(default_factory=list)

    def error(self, file: str, line: int | None, kind: str, message: str) -> None:
        if self.on_error == "fail":
            raise IngestError(file, line, kind, message)
        self.errors.append(RecordError(file, line, kind, message))
        self.counts[kind] += 1


def normalize_text(text: str) -> str:
    """Unicode NFC, then every run of whitespace (newlines, tabs, NBSP...) as one space, trimmed."""
    if not text.isascii():  # ASCII is already NFC; skipping the call is most of the cost on English text
        text = unicodedata.normalize("NFC", text)
    return " ".join(text.split())


def split_words(n_words: int, max_words: int, overlap_words: int) -> list[tuple[int, int]]:
    """Word windows `[start, end)` covering `n_words` words.

    Each window holds `max_words` words and starts `max_words - overlap_words` after the previous
    one; the last ends at the document's end (so it may be shorter, but always keeps more than
    `overlap_words` words). A document of at most `max_words` words is one window.
    """
    if overlap_words >= max_words:
        raise ValueError(f"overlap_words ({overlap_words}) must be smaller than max_words ({max_words})")
    stride = max_words - overlap_words
    windows = [(0, min(n_words, max_words))]
    while windows[-1][1] < n_words:
        start = windows[-1][0] + stride
        windows.append((start, min(n_words, start + max_words)))
    return windows


def detect_format(path: Path, fmt: str = "auto") -> str:
    """The reader to use: `fmt` itself unless it is `auto`, then by extension (a folder: text_dir)."""
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "text_dir"
    found = _FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if found is None:
        raise IngestError(
            str(path), None, "unreadable", f"cannot tell the format from {path.suffix!r}; set corpus.format"
        )
    return found


def corpus_files(path: Path, fmt: str) -> list[Path]:
    """The files to read: `path` itself, or every file of the format's extensions under the folder
    (recursively, sorted, hidden files and folders left out)."""
    if not path.exists():
        raise IngestError(str(path), None, "unreadable", "corpus file or folder not found")
    if path.is_file():
        return [path]
    files = sorted(
        (
            p
            for p in path.rglob("*")
            if p.suffix.lower() in _SUFFIXES[fmt]
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ),
        key=lambda p: p.relative_to(path).as_posix(),
    )
    if not files:
        wanted = "/".join(f"*{s}" for s in _SUFFIXES[fmt])
        raise IngestError(str(path), None, "empty_file", f"no {wanted} files in this folder")
    return files


def ingest_corpus(
    params: CorpusParams, root: Path = Path("."), *, max_record_bytes: int = MAX_RECORD_BYTES
) -> IngestResult:
    """Read the corpus named by `params` (its path relative to `root`) into passages.

    Returns:
        passages with columns passage_id (`<doc_id>#<window>`, so the same input gives the same
        ids), doc_id, title, text, n_words, source (`file:line`, `file:row` for Parquet, `file`
        for a text file); the report counts; the skipped records.

    Raises:
        IngestError: a bad record with `on_error: fail`; a missing or unrecognised corpus, or a
        corpus that leaves no passage, whatever `on_error` says.
    """
    import pyarrow as pa

    started = time.perf_counter()
    root = Path(root)
    path = params.path if params.path.is_absolute() else root / params.path
    fmt = detect_format(path, params.format)
    files = corpus_files(path, fmt)
    sink = _Sink(params.on_error)
    out = _Passages(params, sink)
    input_bytes = 0
    for file in files:
        label = _label(file, root)
        rel = file.name if file == path else file.relative_to(path).as_posix()
        sink.counts["files"] += 1
        try:
            input_bytes += file.stat().st_size
            for doc in _READERS[fmt](file, label, rel, params, sink, max_record_bytes):
                out.add(doc)
        except OSError as err:
            sink.error(label, None, "unreadable", f"cannot read: {err.strerror or err}")

    sink.counts["passages"] = len(out.cols["passage_id"])
    sink.counts["errors"] = len(sink.errors)
    if not out.cols["passage_id"]:
        detail = f"; first skipped: {sink.errors[0].file}: {sink.errors[0].message}" if sink.errors else ""
        raise IngestError(_label(path, root), None, "no_passages", f"no passages left after ingest{detail}")
    passages = pa.table(out.cols, schema=passages_schema())
    report = {name: int(sink.counts[name]) for name in REPORT_METRICS}
    return IngestResult(passages, report, sink.errors, time.perf_counter() - started, input_bytes)


def cut_passages(text: str, max_words: int, overlap_words: int) -> list[tuple[int, str, int]]:
    """`(window index, passage text, word count)` for each window of a normalised text."""
    # Normalised text has single spaces, so counting them avoids splitting most documents.
    n_words = text.count(" ") + 1 if text else 0
    if n_words <= max_words:
        return [(0, text, n_words)]
    words = text.split(" ")
    return [(k, " ".join(words[a:b]), b - a) for k, (a, b) in enumerate(split_words(n_words, max_words, overlap_words))]


class _Passages:
    """Columns of the passages table, filled document by document, with the doc and passage dedup."""

    def __init__(self, params: CorpusParams, sink: _Sink) -> None:
        self.params, self.sink, self.counts = params, sink, sink.counts
        self.cols: dict[str, list] = {name: [] for name in passages_schema().names}
        # doc id -> (hash of title and text, source): Python's 64-bit hash is enough, since it is
        # only compared between records that already share an id.
        self.first_seen: dict[str, tuple[int, str]] = {}
        # The set holds the very string objects of the `text` column: exact dedup with no copy of
        # the corpus and no chance of a hash collision dropping a passage.
        self.seen_texts: set[str] = set()

    def add(self, doc: Document) -> None:
        content = hash((doc.title, doc.text))
        earlier = self.first_seen.get(doc.doc_id)
        if earlier is not None:
            if earlier[0] == content:
                self.counts["duplicate_docs"] += 1
            else:
                message = f"doc id {doc.doc_id!r} already read at {earlier[1]} with a different title or text"
                self.sink.error(doc.file, doc.line, "duplicate_id", message)
            return
        source = doc.source
        self.first_seen[doc.doc_id] = (content, source)
        self.counts["documents"] += 1
        pieces = cut_passages(doc.text, self.params.max_words, self.params.overlap_words)
        self.counts["docs_split"] += len(pieces) > 1
        self.counts["passages_cut"] += len(pieces)
        cols = self.cols
        for k, text, size in pieces:
            if size < self.params.min_words:
                self.counts["dropped_short"] += 1
            elif text in self.seen_texts:
                self.counts["duplicates"] += 1
            else:
                self.seen_texts.add(text)
                cols["passage_id"].append(f"{doc.doc_id}#{k}")
                cols["doc_id"].append(doc.doc_id)
                cols["title"].append(doc.title)
                cols["text"].append(text)
                cols["n_words"].append(size)
                cols["source"].append(source)


def passages_schema() -> pa.Schema:
    """Columns of the `passages` table (a function, so pyarrow is imported only when needed)."""
    import pyarrow as pa

    return pa.schema(
        [
            ("passage_id", pa.string()),
            ("doc_id", pa.string()),
            ("title", pa.string()),
            ("text", pa.string()),
            ("n_words", pa.int32()),
            ("source", pa.string()),
        ]
    )


def _label(path: Path, root: Path) -> str:
    """How messages and `source` name a file: relative to the project root when inside it."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _make_document(
    label: str, line: int | None, raw_id: Any, raw_title: Any, raw_text: Any, sink: _Sink
) -> Document | None:
    """Check one record's field types and content; the normalised document, or None if bad."""
    if raw_id is _MISSING or raw_id is None or raw_id == "":
        sink.error(label, line, "missing_id", "no document id")
        return None
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        sink.error(label, line, "wrong_type", f"id must be a string or an integer, got {type(raw_id).__name__}")
        return None
    if raw_text is _MISSING or raw_text is None:
        sink.error(label, line, "missing_text", "no text field (or it is null)")
        return None
    if not isinstance(raw_text, str):
        sink.error(label, line, "wrong_type", f"text must be a string, got {type(raw_text).__name__}")
        return None
    if raw_title is _MISSING or raw_title is None:
        raw_title = ""
    if not isinstance(raw_title, str):
        sink.error(label, line, "wrong_type", f"title must be a string, got {type(raw_title).__name__}")
        return None
    fields = {"id": str(raw_id), "title": raw_title, "text": raw_text}
    for name, value in fields.items():
        if "\x00" in value:
            sink.error(label, line, "nul_byte", f"NUL character in {name}")
            return None
        problem = _utf8_problem(value)
        if problem:
            sink.error(label, line, "undecodable", f"{problem} in {name}")
            return None
    doc_id = fields["id"].strip()
    if not doc_id:
        sink.error(label, line, "missing_id", "document id is blank")
        return None
    return Document(doc_id, normalize_text(raw_title), normalize_text(raw_text), label, line)


def _utf8_problem(value: str) -> str | None:
    """Why `value` cannot be stored as UTF-8, or None: a byte kept by surrogateescape, a lone surrogate."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(value[err.start])
        if 0xDC80 <= code <= 0xDCFF:  # a raw byte that surrogateescape decoding carried along
            return f"invalid UTF-8 byte 0x{code - 0xDC00:02x}"
        return f"lone surrogate U+{code:04X}"
    return None


def _read_jsonl(
    path: Path, label: str, rel: str, params: CorpusParams, sink: _Sink, limit: int
) -> Iterator[Document]:
    """One JSON object per line; blank lines are counted and passed over."""
    counts = sink.counts
    line = 0
    records = 0
    with path.open("rb") as f:
        while True:
            # Bounded read: a 10 GB line costs `limit` bytes of memory, not 10 GB.
            raw = f.readline(limit + 1)
            if not raw:
                break
            line += 1
            if len(raw) > limit:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line in bounded steps
                    raw = f.readline(1 << 20)
                counts["records_read"] += 1
                records += 1
                sink.error(label, line, "too_long", f"line longer than {limit} bytes")
                continue
            if line == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM some editors write
                raw = raw[3:]
            if not raw.strip():
                counts["blank_lines"] += 1
                continue
            counts["records_read"] += 1
            records += 1
            nul_at = raw.find(b"\x00")
            if nul_at >= 0:
                sink.error(label, line, "nul_byte", f"NUL byte at column {nul_at + 1}")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                sink.error(
                    label, line, "undecodable", f"invalid UTF-8 byte 0x{raw[err.start]:02x} at column {err.start + 1}"
                )
                continue
            try:
                obj = json.loads(text)
            except (ValueError, RecursionError) as err:  # RecursionError: absurdly deep nesting
                # A pretty-printed JSON array is the usual mistake; say so rather than "Expecting value".
                hint = " (one JSON object per line is expected, not a JSON array)" if text.lstrip()[:1] == "[" else ""
                sink.error(label, line, "malformed", f"not valid JSON: {err}{hint}")
                continue
            if not isinstance(obj, dict):
                sink.error(label, line, "malformed", f"expected a JSON object, got {type(obj).__name__}")
                continue
            title = obj.get(params.title_field, _MISSING) if params.title_field else None
            doc = _make_document(
                label, line, obj.get(params.id_field, _MISSING), title, obj.get(params.text_field, _MISSING), sink
            )
            if doc is not None:
                yield doc
    if records == 0:
        sink.error(label, None, "empty_file", "no records in this file")


def _read_csv(
    path: Path, label: str, rel: str, params: CorpusParams, sink: _Sink, limit: int
) -> Iterator[Document]:
    """A header row naming the fields, then one record per row (quoted fields may span lines)."""
    # surrogateescape keeps undecodable bytes as markers, so one bad row is reported (with its line)
    # instead of the whole file failing to decode.
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, strict=True)
        saved_limit = csv.field_size_limit(limit)  # module-wide setting: put back in `finally`
        try:
            yield from _csv_rows(reader, label, params, sink)
        finally:
            csv.field_size_limit(saved_limit)


def _csv_rows(reader: Any, label: str, params: CorpusParams, sink: _Sink) -> Iterator[Document]:
    counts = sink.counts
    header: list[str] | None = None
    index: dict[str, int] = {}
    records = 0
    while True:
        start = reader.line_num + 1  # the record's first line (quoted fields can span several)
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            if header is None:
                sink.error(label, start, "malformed", f"unreadable CSV header: {err}")
                return
            counts["records_read"] += 1
            records += 1
            # The csv module has one exception type; its message is the only way to tell size apart.
            kind = "too_long" if "field larger than field limit" in str(err) else "malformed"
            sink.error(label, start, kind, f"bad CSV row: {err}")
            continue
        if not row or (len(row) == 1 and not row[0].strip()):
            counts["blank_lines"] += 1
            continue
        if header is None:
            header = [h.strip() for h in row]
            index = {name: i for i, name in enumerate(header)}
            for name, kind in ((params.id_field, "missing_id"), (params.text_field, "missing_text")):
                if name not in index:
                    sink.error(label, start, kind, f"no column {name!r} in the header (columns: {', '.join(header)})")
                    return
            continue
        counts["records_read"] += 1
        records += 1
        if len(row) != len(header):
            sink.error(label, start, "ragged_row", f"{len(row)} fields where the header has {len(header)}")
            continue
        title_at = index.get(params.title_field) if params.title_field else None
        doc = _make_document(
            label,
            start,
            row[index[params.id_field]],
            row[title_at] if title_at is not None else None,
            row[index[params.text_field]],
            sink,
        )
        if doc is not None:
            yield doc
    if header is None:
        sink.error(label, None, "empty_file", "no header and no records in this file")
    elif records == 0:
        sink.error(label, None, "empty_file", "a header but no records in this file")


def _read_parquet(
    path: Path, label: str, rel: str, params: CorpusParams, sink: _Sink, limit: int
) -> Iterator[Document]:
    """Columns named by the params; `line` in messages is the 1-based row number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    counts = sink.counts
    try:
        pf = pq.ParquetFile(path)
        schema = pf.schema_arrow
    except (pa.ArrowException, ValueError) as err:
        sink.error(label, None, "unreadable", f"not a readable Parquet file: {err}")
        return
    wanted = {"id": params.id_field, "text": params.text_field}
    if params.title_field and params.title_field in schema.names:
        wanted["title"] = params.title_field
    for role, kind in (("id", "missing_id"), ("text", "missing_text")):
        if wanted[role] not in schema.names:
            sink.error(label, None, kind, f"no column {wanted[role]!r} (columns: {', '.join(schema.names)})")
            return
    for role, column in wanted.items():
        typ = schema.field(column).type
        ok = _is_string_type(typ) or (role == "id" and pa.types.is_integer(typ))
        if not ok:
            sink.error(label, None, "wrong_type", f"column {column!r} ({role}) has type {typ}; the whole file is skipped")
            return
    if pf.metadata.num_rows == 0:
        sink.error(label, None, "empty_file", "no rows in this file")
        return
    row = 0
    try:
        for batch in pf.iter_batches(columns=list(wanted.values()), batch_size=16384):
            ids = _pylist(batch.column(wanted["id"]))
            texts = _pylist(batch.column(wanted["text"]))
            titles = _pylist(batch.column(wanted["title"])) if "title" in wanted else [None] * len(ids)
            for raw_id, raw_title, raw_text in zip(ids, titles, texts):
                row += 1
                counts["records_read"] += 1
                if isinstance(raw_text, str) and len(raw_text) > limit:
                    sink.error(label, row, "too_long", f"text longer than {limit} characters")
                    continue
                doc = _make_document(label, row, raw_id, raw_title, raw_text, sink)
                if doc is not None:
                    yield doc
    except (pa.ArrowException, UnicodeDecodeError) as err:
        sink.error(label, row + 1, "unreadable", f"cannot read rows from here on: {err}")


def _pylist(column: Any) -> list:
    """Python values of an Arrow column; invalid UTF-8 in a string column is carried as
    surrogateescape markers, so `_make_document` reports the exact row instead of losing the batch."""
    import pyarrow as pa

    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        raw = column.cast(pa.large_binary()).to_pylist()  # a reinterpretation: no UTF-8 check
        return [None if v is None else v.decode("utf-8", "surrogateescape") for v in raw]


def _is_string_type(typ: Any) -> bool:
    import pyarrow as pa

    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)


def _read_text_file(
    path: Path, label: str, rel: str, params: CorpusParams, sink: _Sink, limit: int
) -> Iterator[Document]:
    """A whole file is one document with id `rel`; a Markdown file's leading `# heading` is its title."""
    counts = sink.counts
    counts["records_read"] += 1
    if path.stat().st_size > limit:
        sink.error(label, None, "too_long", f"file larger than {limit} bytes")
        return
    data = path.read_bytes()
    if not data.strip():
        sink.error(label, None, "empty_file", "the file is empty")
        return
    if b"\x00" in data:
        sink.error(label, data.count(b"\n", 0, data.index(b"\x00")) + 1, "nul_byte", "NUL byte (a binary file?)")
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        sink.error(label, line, "undecodable", f"invalid UTF-8 byte 0x{data[err.start]:02x}")
        return
    title = ""
    if path.suffix.lower() == ".md":
        first, _, rest = text.lstrip().partition("\n")
        if first.startswith("# "):
            title, text = first[2:], rest
    doc = _make_document(label, None, rel, title, text, sink)
    if doc is not None:
        yield doc


# One signature for all readers (file, label for messages, path inside the corpus folder, params,
# sink, size limit): only the text reader needs the relative path, as the document id.
_READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet, "text_dir": _read_text_file}
