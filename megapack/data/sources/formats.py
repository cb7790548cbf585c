"""Records -> validated Conversations / Documents for the alpaca, sharegpt, openai and text formats.

The formats follow LLaMA-Factory v0.9.5 (data/README.md and its dataset converters): a sharegpt/openai chat may open
with a system turn, then has user/observation turns at odd positions and assistant/function_call turns at even ones,
and ends on an assistant/function_call turn; an alpaca record's user turn is `instruction + "\\n" + input`. Where
LLaMA-Factory silently drops or keeps a broken record, megapack reports it as a BadRecord with a stable reason
(see REASONS); `handle_bad_record` then skips-and-counts or fails. Nothing is dropped silently.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from megapack.data.sources.conversation import (
    ASSISTANT, FUNCTION_CALL, OBSERVATION, SYSTEM, USER,
    BadRecord, Conversation, Document, Message, Record, SkipReport,
)
from megapack.data.sources.limits import TOO_DEEP, TOO_LARGE, ReadLimits
from megapack.data.sources.readers import iter_records
from megapack.data.sources.registry import DatasetSpec
from megapack.errors import MegapackError

# Every reason a record can be rejected for (the keys of SkipReport.counts).
REASONS = (
    "invalid JSON", "invalid UTF-8", "malformed row", "not an object", "missing column", "bad column type",
    "unknown role", "broken alternation", "empty content", "non-string content", "ends on user turn", TOO_DEEP,
    TOO_LARGE,
)
ON_ERROR = ("skip", "fail")

# Column names per format. alpaca/sharegpt/openai follow LLaMA-Factory's; for files given directly (not through a
# registry entry, which sets these to None unless named) the optional system/tools/history columns are read if present.
DEFAULT_COLUMNS: dict[str, dict[str, str | None]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               "system": "system"},
    "sharegpt": {"messages": "conversations", "system": "system", "tools": "tools"},
    "openai": {"messages": "messages", "system": "system", "tools": "tools"},
    "text": {"text": "text"},
}
_SHAREGPT_TAGS = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system",
}
# LLaMA-Factory documents OpenAI messages as sharegpt with these tags; tool results use the OpenAI role "tool".
_OPENAI_TAGS = {
    "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
    "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system",
}
DEFAULT_TAGS = {"sharegpt": _SHAREGPT_TAGS, "openai": _OPENAI_TAGS}

Converter = Callable[[str, dict], Record | BadRecord]


class _Bad(Exception):
    """Internal: a record is rejected with (reason, detail)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason, self.detail = reason, detail


def make_converter(formatting: str, columns: dict[str, str | None] | None = None,
                   tags: dict[str, str] | None = None) -> Converter:
    """A function (source, raw record) -> Record | BadRecord for one format with column/tag overrides."""
    if formatting not in DEFAULT_COLUMNS:
        raise MegapackError(f"format {formatting!r} is not supported; expected one of {', '.join(DEFAULT_COLUMNS)}")
    cols = {**DEFAULT_COLUMNS[formatting], **(columns or {})}
    if formatting == "text":
        body: Callable[[dict], Record] = lambda rec: Document(_text(rec, cols["text"]))
    elif formatting == "alpaca":
        body = lambda rec: _alpaca(rec, cols)
    else:
        tag = {**DEFAULT_TAGS[formatting], **(tags or {})}
        body = lambda rec: _chat(rec, cols, tag, openai=formatting == "openai")

    def convert(source: str, record: Any) -> Record | BadRecord:
        if not isinstance(record, dict):
            return BadRecord(source, "not an object", f"a JSON {_kind(record)} where a record object was expected")
        try:
            parsed = body(record)
        except _Bad as bad:
            return BadRecord(source, bad.reason, bad.detail)
        parsed.source = source
        return parsed

    return convert


def detect_format(record: Any) -> tuple[str, dict[str, str]] | None:
    """(formatting, column overrides) guessed from one record's keys, or None when nothing matches."""
    if not isinstance(record, dict):
        return None
    for column in ("conversations", "messages"):
        turns = record.get(column)
        if isinstance(turns, list):
            first = next((t for t in turns if isinstance(t, dict)), {})
            # the key style of the turns decides the tags: from/value (sharegpt) or role/content (openai)
            style = "sharegpt" if "from" in first or ("role" not in first and column == "conversations") else "openai"
            return style, {"messages": column}
    if "instruction" in record or "output" in record:
        return "alpaca", {}
    if "text" in record:
        return "text", {}
    return None


def parse_records(spec: DatasetSpec, limits: ReadLimits = ReadLimits()) -> Iterator[Record | BadRecord]:
    """Stream a dataset's parsed records and bad records in file order; `auto` picks the format on each file's first
    usable record (a folder may hold an alpaca file beside a sharegpt one)."""
    fixed = None if spec.formatting == "auto" else make_converter(spec.formatting, spec.columns, spec.tags)
    produced = 0
    for path in spec.files:
        convert = fixed
        for item in iter_records(path, limits):
            if isinstance(item, BadRecord):
                yield item
                continue
            source, record = item
            if convert is None:
                detected = detect_format(record)
                if detected is None:
                    yield _undetected(source, record)
                    continue
                formatting, overrides = detected
                convert = make_converter(formatting, {**overrides, **spec.columns}, spec.tags)
            parsed = convert(source, record)
            yield parsed
            if not isinstance(parsed, BadRecord):
                produced += 1
                # LLaMA-Factory draws num_samples at random; a stream takes the first ones
                if spec.num_samples is not None and produced >= spec.num_samples:
                    return


def handle_bad_record(item: BadRecord, on_error: str, report: SkipReport) -> None:
    """The bad-record policy, applied in this one place: count it into `report` ("skip") or stop ("fail")."""
    if on_error not in ON_ERROR:
        raise MegapackError(f"--on-error {on_error!r} is not supported; expected one of {', '.join(ON_ERROR)}")
    if on_error == "fail":
        detail = f" ({item.detail})" if item.detail else ""
        raise MegapackError(f"{item.source}: {item.reason}{detail}")
    report.add(item)


def _undetected(source: str, record: Any) -> BadRecord:
    if not isinstance(record, dict):
        return BadRecord(source, "not an object", f"a JSON {_kind(record)} where a record object was expected")
    keys = ", ".join(sorted(map(str, record))[:6]) or "none"
    return BadRecord(source, "missing column",
                     f"cannot detect the format: no conversations/messages/instruction/text key (keys: {keys})")


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
            int: "number", float: "number"}.get(type(value), type(value).__name__)


def _text(record: dict, column: str | None) -> str:
    if not column or column not in record:
        raise _Bad("missing column", f"no {column!r} key")
    value = record[column]
    if not isinstance(value, str):
        raise _Bad("non-string content", f"{column!r} is a {_kind(value)}")
    if not value.strip():
        raise _Bad("empty content", f"{column!r} is empty")
    return value


def _optional_text(record: dict, column: str | None) -> str | None:
    """A system-prompt-like column: absent, null or empty -> None."""
    if not column or record.get(column) is None:
        return None
    value = record[column]
    if not isinstance(value, str):
        raise _Bad("non-string content", f"{column!r} is a {_kind(value)}")
    return value if value.strip() else None


def _tools(record: dict, column: str | None) -> str | None:
    if not column or record.get(column) in (None, "", [], {}):
        return None
    value = record[column]
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    if not isinstance(value, str):
        raise _Bad("non-string content", f"{column!r} is a {_kind(value)}")
    return value


def _alpaca(record: dict, cols: dict[str, str | None]) -> Conversation:
    messages: list[Message] = []
    history_col = cols.get("history")
    history = record.get(history_col) if history_col else None
    if history is not None:
        if not isinstance(history, list):
            raise _Bad("bad column type",
                       f"{history_col!r} is a {_kind(history)}, expected a list of [prompt, response]")
        for i, pair in enumerate(history):
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise _Bad("bad column type", f"{history_col}[{i}] is not a [prompt, response] pair")
            for role, text, what in ((USER, pair[0], "prompt"), (ASSISTANT, pair[1], "response")):
                if not isinstance(text, str):
                    raise _Bad("non-string content", f"{history_col}[{i}] {what} is a {_kind(text)}")
                if not text.strip():
                    raise _Bad("empty content", f"{history_col}[{i}] {what} is empty")
                messages.append(Message(role, text))
    prompt_col, query_col, response_col = cols.get("prompt"), cols.get("query"), cols.get("response")
    present = [c for c in (prompt_col, query_col) if c and c in record]
    if not present:
        raise _Bad("missing column", f"no {prompt_col!r} or {query_col!r} key")
    parts = []
    for column in present:
        value = record[column]
        if value is None:
            continue
        if not isinstance(value, str):
            raise _Bad("non-string content", f"{column!r} is a {_kind(value)}")
        if value:  # LLaMA-Factory joins the non-empty ones: "instruction\ninput"
            parts.append(value)
    user = "\n".join(parts)
    if not user.strip():
        raise _Bad("empty content", f"{' and '.join(repr(c) for c in present)} empty")
    messages.append(Message(USER, user))
    if not response_col or response_col not in record:
        raise _Bad("missing column", f"no {response_col!r} key")
    messages.append(Message(ASSISTANT, _text(record, response_col)))
    system, tools = _optional_text(record, cols.get("system")), _tools(record, cols.get("tools"))
    return Conversation(messages, system=system, tools=tools)


def _chat(record: dict, cols: dict[str, str | None], tags: dict[str, str], openai: bool) -> Conversation:
    column = cols.get("messages")
    if not column or column not in record:
        raise _Bad("missing column", f"no {column!r} key")
    turns = record[column]
    if not isinstance(turns, list):
        raise _Bad("bad column type", f"{column!r} is a {_kind(turns)}, expected a list of messages")
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    mapping = {tags["user_tag"]: USER, tags["assistant_tag"]: ASSISTANT, tags["observation_tag"]: OBSERVATION,
               tags["function_tag"]: FUNCTION_CALL, tags["system_tag"]: SYSTEM}
    system = None
    has_system_turn = False
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        where = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise _Bad("not an object", f"{where} is a {_kind(turn)}")
        if role_tag not in turn:
            raise _Bad("missing column", f"{where} has no {role_tag!r} key")
        tag = turn[role_tag]
        if not isinstance(tag, str) or tag not in mapping:
            raise _Bad("unknown role", f"{where} {role_tag}={tag!r}, expected one of {', '.join(map(repr, mapping))}")
        content = turn.get(content_tag)
        if openai and mapping[tag] in (ASSISTANT, FUNCTION_CALL) and turn.get("tool_calls"):
            tag, content = tags["function_tag"], _tool_calls(turn["tool_calls"], where)
        role = mapping[tag]
        if content_tag not in turn and not (openai and role == FUNCTION_CALL and content is not None):
            raise _Bad("missing column", f"{where} has no {content_tag!r} key")
        content = _content(content, where)
        if role == SYSTEM:
            if i != 0:
                raise _Bad("broken alternation", f"{where} is a system turn; only the first turn may be one")
            system, has_system_turn = (content if content.strip() else None), True
            continue
        if not content.strip():
            raise _Bad("empty content", f"{where} ({tag}) is empty")
        if openai and role == OBSERVATION and messages and messages[-1].role == OBSERVATION:
            # consecutive tool results answer one call: one observation turn (LLaMA-Factory merges them too)
            messages[-1] = Message(OBSERVATION, messages[-1].content + "\n" + content)
            continue
        expected = (USER, OBSERVATION) if len(messages) % 2 == 0 else (ASSISTANT, FUNCTION_CALL)
        if role not in expected:
            raise _Bad("broken alternation",
                       f"{where} is {tag!r} where {' or '.join(expected)} was expected")
        messages.append(Message(role, content))
    if not messages:
        raise _Bad("empty content", f"{column!r} has no turns")
    if len(messages) % 2:
        raise _Bad("ends on user turn", f"the last turn is {messages[-1].role}, expected assistant or function_call")
    if not has_system_turn:
        system = _optional_text(record, cols.get("system"))
    return Conversation(messages, system=system, tools=_tools(record, cols.get("tools")))


def _content(content: Any, where: str) -> str:
    """A turn's text: a string, or a list of text parts ({"type": "text", "text"|"value": ...}) joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            text = part.get("text", part.get("value")) if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(text, str):
                kind = part.get("type") if isinstance(part, dict) else _kind(part)
                raise _Bad("non-string content", f"{where} content part {j} is {kind!r}, only text parts are supported")
            texts.append(text)
        return "".join(texts)
    raise _Bad("non-string content", f"{where} content is a {_kind(content)}")


def _tool_calls(calls: Any, where: str) -> str:
    """OpenAI `tool_calls` -> the JSON list of their `function` objects, as LLaMA-Factory renders a function call."""
    if not isinstance(calls, list) or not all(isinstance(c, dict) and isinstance(c.get("function"), dict)
                                              for c in calls):
        raise _Bad("bad column type", f"{where} tool_calls is not a list of {{'function': {{...}}}} objects")
    return json.dumps([c["function"] for c in calls], ensure_ascii=False)
