"""Bounds on one record, so that a hostile file costs bounded memory and time: nesting depth and size.

A record past either bound is a BadRecord ("too deeply nested", "record too large") with its file:line, like any other
bad record. A record's size is its text in a line-based file (.jsonl, .txt, JSON lines in a .json file), measured
before it is parsed, so a huge line is never held whole; in a JSON array, parquet, Arrow or CSV file it is the length
of its strings and keys plus 8 bytes per other value. Depth counts containers: the record object itself is level 1;
JSON lines cannot go past about 1,000 levels whatever the limit (Python's parser recurses).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

from megapack.data.sources.conversation import BadRecord

TOO_DEEP, TOO_LARGE = "too deeply nested", "record too large"
DEFAULT_MAX_DEPTH = 100
DEFAULT_MAX_BYTES = 16 * 2**20
_SKIP_CHUNK = 1 << 20
_SCALAR_BYTES = 8


@dataclass(frozen=True)
class ReadLimits:
    """The largest record a reader accepts: nesting depth (--max-record-depth) and bytes (--max-record-bytes)."""

    max_depth: int = DEFAULT_MAX_DEPTH
    max_bytes: int = DEFAULT_MAX_BYTES

    def too_deep(self, source: str, parser_limit: bool = False) -> BadRecord:
        """The bad record for a record nested deeper than max_depth (or than Python's JSON parser can go)."""
        if parser_limit:
            return BadRecord(source, TOO_DEEP, "nested deeper than Python's JSON parser allows (about 1,000 levels)")
        return BadRecord(source, TOO_DEEP, f"nested deeper than {self.max_depth} levels (raise --max-record-depth)")

    def too_large(self, source: str) -> BadRecord:
        """The bad record for a record larger than max_bytes."""
        return BadRecord(source, TOO_LARGE, f"larger than {self.max_bytes} bytes (raise --max-record-bytes)")

    def bad(self, source: str, reason: str) -> BadRecord:
        """The bad record for `reason` (TOO_DEEP or TOO_LARGE)."""
        return self.too_deep(source) if reason == TOO_DEEP else self.too_large(source)

    def check(self, source: str, record: Any) -> BadRecord | None:
        """The bad record `record` (already parsed) is under these limits, or None when it is within them."""
        depth, size = measure(record, self.max_depth, self.max_bytes)
        if depth > self.max_depth:
            return self.too_deep(source)
        return self.too_large(source) if size > self.max_bytes else None


def measure(record: Any, max_depth: int, max_bytes: int) -> tuple[int, int]:
    """(nesting depth, size estimate) of a parsed record; stops early once either passes its bound."""
    depth = size = 0
    stack = [(record, 1)]
    while stack:
        obj, level = stack.pop()
        if isinstance(obj, dict):
            depth = max(depth, level)
            size += sum(len(k) if isinstance(k, str) else _SCALAR_BYTES for k in obj)
            stack.extend((v, level + 1) for v in obj.values())
        elif isinstance(obj, (list, tuple)):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in obj)
        else:
            size += len(obj) if isinstance(obj, (str, bytes)) else _SCALAR_BYTES
        if depth > max_depth or size > max_bytes:
            break
    return depth, size


def bounded_lines(fp: BinaryIO, max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary file; None for a line longer than max_bytes, skipped without holding it."""
    lineno = 0
    while True:
        raw = fp.readline(max_bytes + 2)  # room for "\r\n" after a line of exactly max_bytes
        if not raw:
            return
        lineno += 1
        if len(raw) > max_bytes and len(raw.rstrip(b"\r\n")) > max_bytes:
            while raw and not raw.endswith(b"\n"):
                raw = fp.readline(_SKIP_CHUNK)
            yield lineno, None
        else:
            yield lineno, raw


def may_be_too_deep(raw: bytes, max_depth: int) -> bool:
    """Whether a JSON text could nest deeper than max_depth (a count of its brackets: exact depth only if so)."""
    return raw.count(b"[") + raw.count(b"{") > max_depth


_OPEN = {"start_map": dict, "start_array": list}
_CLOSE = ("end_map", "end_array")


def build_items(events: Iterator[tuple[str, Any]], limits: ReadLimits) -> Iterator[tuple[Any, str | None]]:
    """(item, None) or (None, reason) for each item of a top-level JSON array, from ijson.basic_parse events.

    Builds items itself instead of ijson.items, whose path prefixes grow with depth (memory quadratic in it); a
    container past max_depth or a record past max_bytes is consumed to its end without being built."""
    first = next(events, None)
    if first is None or first[0] != "start_array":
        return
    for event, value in events:
        if event == "end_array":
            return
        if event not in _OPEN:
            yield value, None
            continue
        yield _build(event, events, limits)


def _build(start: str, events: Iterator[tuple[str, Any]], limits: ReadLimits) -> tuple[Any, str | None]:
    """One container item from its start event through its matching end event."""
    root = _OPEN[start]()
    stack: list = [root]
    key: str | None = None
    size, reason = 0, None
    for event, value in events:
        if event in _CLOSE:
            stack.pop()
            if not stack:
                return (root, None) if reason is None else (None, reason)
            continue
        if event == "map_key":
            key = value
            size += len(value)
            continue
        if event in _OPEN:
            if len(stack) >= limits.max_depth:
                reason = reason or TOO_DEEP
            value = _OPEN[event]()
        else:
            size += len(value) if isinstance(value, str) else _SCALAR_BYTES
            if size > limits.max_bytes:
                reason = reason or TOO_LARGE
        if reason is not None:
            root = None
            if event in _OPEN:
                stack.append(None)  # only the depth is tracked from here on
            continue
        parent = stack[-1]
        if isinstance(parent, dict):
            parent[key] = value
        else:
            parent.append(value)
        if event in _OPEN:
            stack.append(value)
    from ijson.common import IncompleteJSONError

    raise IncompleteJSONError("the file ends inside a record")
