"""Streaming record readers for dataset files: .json, .jsonl, .parquet, .csv, .arrow, .txt.

Every reader yields `(source, record)` pairs, or a `BadRecord` for a record that cannot be parsed (an invalid JSON
line). `source` is "path:line" for line-based files (.jsonl, .txt, JSON lines in a .json file) and "path:index"
(1-based) for .json arrays, .parquet, .csv and .arrow. Nothing is loaded whole: memory stays independent of the file
size, and one record's depth and size are bounded by `ReadLimits` (megapack.data.sources.limits): a record past them
is a BadRecord. A file that cannot be read past a point (a corrupt .json array, a damaged parquet file) raises
`MegapackError`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, BinaryIO

from megapack.data.sources.conversation import BadRecord
from megapack.data.sources.limits import ReadLimits, bounded_lines, build_items, may_be_too_deep
from megapack.errors import MegapackError

# Extensions LLaMA-Factory accepts (its FILEEXT2TYPE), mapped to our reader kinds.
EXTENSIONS = {"json": "json", "jsonl": "jsonl", "parquet": "parquet", "csv": "csv", "arrow": "arrow", "txt": "text"}

Record = tuple[str, Any]

# Skipped when a folder is read (a file named directly is read whatever its name).
_DOC_SUFFIXES = (".md", ".markdown", ".rst")
_DOC_STEMS = ("README", "LICENSE", "LICENCE", "CHANGELOG", "NOTICE")
_REGISTRY_NAME = "dataset_info.json"

_BATCH_ROWS = 1024


def file_kind(path: str) -> str:
    """The reader kind of `path` from its extension; MegapackError for an unsupported one."""
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in EXTENSIONS:
        allowed = ", ".join(f".{e}" for e in EXTENSIONS)
        shown = f"'.{ext}'" if ext else "(no extension)"
        raise MegapackError(f"{path}: unsupported file type {shown}; expected one of {allowed}")
    return EXTENSIONS[ext]


def is_documentation(name: str) -> bool:
    """Whether a file name in a dataset folder is documentation or the registry, not data (README.md, LICENSE,
    dataset_info.json: LLaMA-Factory's data/ folder holds such files beside its datasets)."""
    lower = name.lower()
    return (lower.endswith(_DOC_SUFFIXES) or lower.split(".", 1)[0].upper() in _DOC_STEMS
            or lower == _REGISTRY_NAME)


def list_data_files(path: str) -> list[str]:
    """The data files at `path`: the file itself, or every file of a directory, sorted, all one type (hidden
    files, documentation and dataset_info.json skipped)."""
    if os.path.isfile(path):
        file_kind(path)
        return [path]
    if not os.path.isdir(path):
        raise MegapackError(f"{path}: no such file or directory (expected a dataset file or a folder of them)")
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if not name.startswith(".") and not is_documentation(name) and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise MegapackError(f"{path}: the folder contains no dataset files")
    kinds = {file_kind(f) for f in files}
    # LLaMA-Factory requires one file type per dataset folder; .json and .jsonl both load as JSON there.
    if len({"json" if k == "jsonl" else k for k in kinds}) > 1:
        raise MegapackError(f"{path}: the folder mixes file types ({', '.join(sorted(kinds))}); expected one type")
    return files


def iter_records(path: str, limits: ReadLimits = ReadLimits()) -> Iterator[Record | BadRecord]:
    """Stream the records of one data file as (source, record) pairs or BadRecords."""
    kind = file_kind(path)
    if not os.path.isfile(path):
        raise MegapackError(f"{path}: no such file (expected a {kind} dataset file)")
    if kind == "json":
        with open(path, "rb") as fp:
            yield from iter_json(fp, path, limits)
    elif kind == "jsonl":
        with open(path, "rb") as fp:
            yield from iter_json_lines(fp, path, limits)
    elif kind == "text":
        yield from _iter_text(path, limits)
    elif kind == "csv":
        yield from _iter_csv(path, limits)
    else:
        rows = _iter_parquet(path) if kind == "parquet" else _iter_arrow(path)
        for source, record in rows:
            yield limits.check(source, record) or (source, record)


def count_records(path: str, limits: ReadLimits = ReadLimits()) -> int:
    """How many items (records and bad records) iter_records(path) yields, cheaply where the format allows it:
    non-blank lines of JSON lines, the row count of a parquet footer, else a pass over the records."""
    kind = file_kind(path)
    if kind == "jsonl" and os.path.isfile(path):
        with open(path, "rb") as fp:
            return sum(1 for _, line in bounded_lines(fp, limits.max_bytes) if line is None or line.strip())
    if kind == "parquet" and os.path.isfile(path):
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception:  # noqa: BLE001 - iter_records reports an unreadable file in its own words
            return 0
    return sum(1 for _ in iter_records(path, limits))


def iter_json(fp: BinaryIO, name: str, limits: ReadLimits = ReadLimits()) -> Iterator[Record | BadRecord]:
    """Stream a .json file: a top-level array of records (via ijson), or JSON lines as Hugging Face datasets accepts."""
    if fp.read(3) != b"\xef\xbb\xbf":  # skip a UTF-8 byte order mark, which ijson rejects
        fp.seek(0)
    first = _peek_first_byte(fp)
    if first == b"[":
        yield from _iter_json_array(fp, name, limits)
    elif first == b"{":
        yield from _iter_json_lines_in_json(fp, name, limits)
    elif first == b"":
        return
    else:
        found = first.decode(errors="replace")
        raise MegapackError(f"{name}: expected a JSON array of records or JSON lines, found {found!r} at the start")


def iter_json_lines(fp: BinaryIO, name: str, limits: ReadLimits = ReadLimits()) -> Iterator[Record | BadRecord]:
    """Stream JSON lines: one record per non-blank line; an unparsable line is a BadRecord("invalid JSON")."""
    for lineno, raw in bounded_lines(fp, limits.max_bytes):
        source = f"{name}:{lineno}"
        if raw is None:
            yield limits.too_large(source)
            continue
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except RecursionError:
            yield limits.too_deep(source, parser_limit=True)
            continue
        except UnicodeDecodeError as exc:
            yield BadRecord(source, "invalid JSON", f"not UTF-8: {exc.reason} at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            yield BadRecord(source, "invalid JSON", f"{exc.msg} at column {exc.colno}")
            continue
        problem = limits.check(source, record) if may_be_too_deep(raw, limits.max_depth) else None
        yield problem or (source, record)


def _peek_first_byte(fp: BinaryIO) -> bytes:
    """The first non-whitespace byte; leaves `fp` where it was."""
    start = fp.tell()
    head = fp.read(4096)
    while head:
        stripped = head.lstrip()
        if stripped:
            fp.seek(start)
            return stripped[:1]
        head = fp.read(4096)
    fp.seek(start)
    return b""


class _CountingReader:
    """A read-only file wrapper that counts the bytes handed out, to locate parse errors."""

    def __init__(self, fp: BinaryIO) -> None:
        self.fp = fp
        self.consumed = 0
        self.last_chunk_start = 0

    def read(self, size: int = -1) -> bytes:
        data = self.fp.read(size)
        self.last_chunk_start = self.consumed
        self.consumed += len(data)
        return data


def _iter_json_array(fp: BinaryIO, name: str, limits: ReadLimits) -> Iterator[Record | BadRecord]:
    import ijson

    counter = _CountingReader(fp)
    index = 0
    try:
        # use_float: plain floats rather than Decimal, as json.loads gives
        items = build_items(ijson.basic_parse(counter, use_float=True), limits)
        for index, (record, reason) in enumerate(items, start=1):
            yield (f"{name}:{index}", record) if reason is None else limits.bad(f"{name}:{index}", reason)
    except ijson.JSONError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MegapackError(
            f"{name}: corrupt JSON array in record {index + 1} (between bytes {counter.last_chunk_start} and "
            f"{counter.consumed}): {reason}; expected a valid JSON array of records"
        ) from exc
    except UnicodeDecodeError as exc:
        raise MegapackError(f"{name}: not UTF-8 in record {index + 1}; expected a UTF-8 JSON array") from exc


def _iter_json_lines_in_json(fp: BinaryIO, name: str, limits: ReadLimits) -> Iterator[Record | BadRecord]:
    """A .json file starting with an object: JSON lines (one object per line), else a single multi-line object."""
    start = fp.tell()
    first_line = b""
    for _, raw in bounded_lines(fp, limits.max_bytes):
        if raw is None or raw.strip():
            first_line = raw
            break
    fp.seek(start)
    try:
        if first_line is not None:  # a first line past the size limit is reported as a bad record below
            json.loads(first_line)
    except RecursionError:
        pass
    except ValueError:
        raise MegapackError(
            f"{name}: a single top-level JSON object is not a dataset; expected a JSON array of records or "
            "JSON lines (one object per line)"
        ) from None
    yield from iter_json_lines(fp, name, limits)


def _iter_text(path: str, limits: ReadLimits) -> Iterator[Record | BadRecord]:
    # Like Hugging Face's text loader (used by LLaMA-Factory for .txt): one {"text": line} record per line.
    with open(path, "rb") as fp:
        for lineno, raw in bounded_lines(fp, limits.max_bytes):
            source = f"{path}:{lineno}"
            if raw is None:
                yield limits.too_large(source)
                continue
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield BadRecord(source, "invalid UTF-8", f"{exc.reason} at byte {exc.start}")
                continue
            yield source, {"text": line.rstrip("\r\n")}


def _iter_parquet(path: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        index = 0
        for batch in parquet.iter_batches(batch_size=_BATCH_ROWS):
            for record in batch.to_pylist():
                index += 1
                yield f"{path}:{index}", record
    except (pa.ArrowException, OSError) as exc:
        raise MegapackError(f"{path}: unreadable parquet file ({exc}); expected a valid parquet file") from exc


def _iter_arrow(path: str) -> Iterator[Record]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        with pa.memory_map(path, "r") as source:
            try:
                reader = ipc.open_stream(source)  # what Hugging Face datasets writes
                batches = iter(reader)
            except pa.ArrowInvalid:
                source.seek(0)
                file_reader = ipc.open_file(source)
                batches = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
            index = 0
            for batch in batches:
                for record in batch.to_pylist():
                    index += 1
                    yield f"{path}:{index}", record
    except (pa.ArrowException, OSError) as exc:
        raise MegapackError(f"{path}: unreadable Arrow file ({exc}); expected an Arrow IPC stream or file") from exc


def _iter_csv(path: str, limits: ReadLimits) -> Iterator[Record | BadRecord]:
    import csv

    # the csv module's own field limit (128 KiB by default, process-wide) becomes the record limit while reading
    previous = csv.field_size_limit(limits.max_bytes)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fp:
            reader = csv.DictReader(fp)
            index = 0
            while True:
                index += 1
                source = f"{path}:{index}"
                try:
                    row = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    if "field larger than field limit" not in str(exc) or reader.fieldnames is None:
                        raise MegapackError(f"{path}: unreadable CSV near line {reader.line_num} ({exc}); expected "
                                            "UTF-8 CSV with a header") from exc
                    yield limits.too_large(source)
                    continue
                except UnicodeDecodeError as exc:
                    raise MegapackError(f"{path}: unreadable CSV near line {reader.line_num} ({exc}); expected UTF-8 "
                                        "CSV with a header") from exc
                if None in row:  # more fields than the header
                    fields, header = len(row) - 1 + len(row[None]), len(reader.fieldnames or [])
                    yield BadRecord(source, "malformed row", f"row has {fields} fields, header has {header}")
                    continue
                yield limits.check(source, row) or (source, row)
    finally:
        csv.field_size_limit(previous)
