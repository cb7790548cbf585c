"""Record formats -> Conversations/Documents, every bad-record reason, and the skip/fail policy."""
from __future__ import annotations

import json

import pytest

from megapack.data.sources.conversation import BadRecord, Conversation, Document, Message, SkipReport
from megapack.data.sources.formats import REASONS, handle_bad_record, make_converter, parse_records
from megapack.data.sources.registry import DatasetSpec, resolve_datasets
from megapack.errors import MegapackError


def _jsonl(path, lines: list) -> str:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines), encoding="utf-8")
    return str(path)


def _gpt(*turns, **extra) -> dict:
    return {"conversations": [{"from": f, "value": v} for f, v in turns], **extra}


def _read(specs, on_error: str, report: SkipReport) -> list:
    """The parsed records of every dataset in order, bad records through `handle_bad_record` (the tokenize step's
    read path: encode.py hands every BadRecord of `parse_records` to it)."""
    out = []
    for spec in specs:
        for item in parse_records(spec):
            if isinstance(item, BadRecord):
                handle_bad_record(item, on_error, report)
            else:
                out.append(item)
    return out


def test_sharegpt_roles_system_and_tools():
    convert = make_converter("sharegpt")
    record = _gpt(("system", "be brief"), ("human", "weather?"), ("function_call", '{"name": "w"}'),
                  ("observation", "sunny"), ("gpt", "It is sunny."), tools=[{"name": "w"}])
    parsed = convert("f:1", record)
    assert parsed == Conversation(
        [Message("user", "weather?"), Message("function_call", '{"name": "w"}'),
         Message("observation", "sunny"), Message("assistant", "It is sunny.")],
        system="be brief", tools='[{"name": "w"}]', source="f:1")
    # system column used only when there is no leading system turn
    assert convert("f:2", _gpt(("human", "a"), ("gpt", "b"), system="col")).system == "col"


def test_sharegpt_custom_tags_and_columns():
    convert = make_converter("sharegpt", {"messages": "turns"},
                             {"role_tag": "speaker", "content_tag": "text", "user_tag": "U", "assistant_tag": "A"})
    parsed = convert("f:1", {"turns": [{"speaker": "U", "text": "hi"}, {"speaker": "A", "text": "yo"}]})
    assert parsed.messages == [Message("user", "hi"), Message("assistant", "yo")]


def test_openai_tool_calls_tool_results_and_text_parts():
    convert = make_converter("openai")
    record = {"messages": [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": [{"type": "text", "text": "2+2 and 3+3?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": [{"type": "text", "value": "4 and "}, {"type": "text", "value": "6"}]},
    ]}
    parsed = convert("f:1", record)
    assert parsed.system == "sys"
    assert parsed.messages == [
        Message("user", "2+2 and 3+3?"),
        Message("function_call", '[{"name": "add", "arguments": "{\\"a\\": 2}"}]'),
        Message("observation", "4\n6"),
        Message("assistant", "4 and 6"),
    ]


def test_alpaca_join_history_system_and_text():
    convert = make_converter("alpaca")
    parsed = convert("f:1", {"instruction": "Translate", "input": "bonjour", "output": "hello",
                             "system": "S", "history": [["q1", "a1"]]})
    assert parsed == Conversation([Message("user", "q1"), Message("assistant", "a1"),
                                   Message("user", "Translate\nbonjour"), Message("assistant", "hello")],
                                  system="S", source="f:1")
    assert convert("f:2", {"instruction": "Say hi", "input": "", "output": "hi"}).messages[0].content == "Say hi"
    assert make_converter("text")("f:3", {"text": "doc"}) == Document("doc", source="f:3")


BAD_CASES = [  # (record line, expected reason)
    ('{"conversations": [', "invalid JSON"),
    ([1, 2], "not an object"),
    ({"messages": []}, "missing column"),
    (_gpt(("human", "a"), ("bot", "b")), "unknown role"),
    (_gpt(("human", "a"), ("human", "b")), "broken alternation"),
    (_gpt(("gpt", "a"), ("human", "b")), "broken alternation"),
    (_gpt(("human", "a"), ("gpt", "b"), ("system", "c"), ("gpt", "d")), "broken alternation"),
    (_gpt(("human", "a"), ("gpt", "  ")), "empty content"),
    ({"conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "b"}]}, "non-string content"),
    (_gpt(("human", "a"), ("gpt", "b"), ("human", "c")), "ends on user turn"),
    (_gpt(("system", "s"), ("human", "a")), "ends on user turn"),
    ({"conversations": [{"from": "human", "value": "a"}, "gpt: b"]}, "not an object"),
    ({"conversations": [{"value": "a"}, {"from": "gpt", "value": "b"}]}, "missing column"),
    ({"conversations": "human: a"}, "bad column type"),
    (_gpt(), "empty content"),
]


def test_every_bad_reason_is_reported_with_its_line(tmp_path):
    lines = [_gpt(("human", "ok"), ("gpt", "fine"))] + [line for line, _ in BAD_CASES]
    path = _jsonl(tmp_path / "chat.jsonl", lines)
    [spec] = resolve_datasets([path], None, None, fmt="sharegpt")
    items = list(parse_records(spec))
    assert isinstance(items[0], Conversation) and items[0].source == f"{path}:1"
    got = [(b.source, b.reason) for b in items[1:]]
    assert got == [(f"{path}:{i}", reason) for i, (_, reason) in enumerate(BAD_CASES, start=2)]
    assert all(isinstance(b, BadRecord) and b.detail for b in items[1:])
    assert {r for _, r in BAD_CASES} <= set(REASONS)


def test_bad_alpaca_and_text_records():
    alpaca = make_converter("alpaca")
    cases = [
        ({"output": "x"}, "missing column"),
        ({"instruction": "q"}, "missing column"),
        ({"instruction": "", "input": "", "output": "x"}, "empty content"),
        ({"instruction": "q", "output": ""}, "empty content"),
        ({"instruction": ["q"], "output": "x"}, "non-string content"),
        ({"instruction": "q", "output": 3}, "non-string content"),
        ({"instruction": "q", "output": "x", "history": "q0"}, "bad column type"),
        ({"instruction": "q", "output": "x", "history": [["q0"]]}, "bad column type"),
        ({"instruction": "q", "output": "x", "history": [["q0", None]]}, "non-string content"),
    ]
    assert [alpaca("f:1", rec).reason for rec, _ in cases] == [reason for _, reason in cases]
    text = make_converter("text")
    assert [text("f:1", r).reason for r in ({"body": "x"}, {"text": 1}, {"text": "\n"})] == [
        "missing column", "non-string content", "empty content"]


def test_auto_detects_each_format(tmp_path):
    cases = {
        "sg.jsonl": (_gpt(("human", "a"), ("gpt", "b")), "user"),
        "oa.jsonl": ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                     "user"),
        "oa_conv.jsonl": ({"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
                          "user"),
        "al.jsonl": ({"instruction": "a", "output": "b"}, "user"),
    }
    for name, (record, role) in cases.items():
        path = _jsonl(tmp_path / name, [{"unrelated": 1}, record])
        [spec] = resolve_datasets([path], None, None)
        bad, parsed = list(parse_records(spec))
        assert (bad.source, bad.reason) == (f"{path}:1", "missing column")  # nothing to detect from: reported
        assert parsed.messages == [Message(role, "a"), Message("assistant", "b")], name
    doc_path = _jsonl(tmp_path / "t.jsonl", [{"text": "hello"}])
    assert list(parse_records(resolve_datasets([doc_path], None, None)[0])) == [Document("hello", f"{doc_path}:1")]


def test_skip_counts_and_fail_stops_at_first(tmp_path):
    path = _jsonl(tmp_path / "mix.jsonl", [
        _gpt(("human", "a"), ("gpt", "b")),
        _gpt(("human", "a"), ("robot", "b")),
        "not json",
        _gpt(("human", "a"), ("gpt", "c")),
        _gpt(("human", "a")),
    ])
    spec = DatasetSpec("mix", path)
    report = SkipReport()
    kept = _read([spec], "skip", report)
    assert [s.source for s in kept] == [f"{path}:1", f"{path}:4"]
    assert report.counts == {"unknown role": 1, "invalid JSON": 1, "ends on user turn": 1}
    assert sum(report.counts.values()) == 3
    assert report.examples[0].startswith(f"{path}:2: unknown role (conversations[1] from='robot'")

    seen = []
    with pytest.raises(MegapackError) as err:
        for item in parse_records(spec):
            if isinstance(item, BadRecord):
                handle_bad_record(item, "fail", SkipReport())
            seen.append(item.source)
    assert seen == [f"{path}:1"]
    assert str(err.value).startswith(f"{path}:2: unknown role (conversations[1] from='robot', expected one of")
    with pytest.raises(MegapackError, match="--on-error 'ignore'"):
        handle_bad_record(BadRecord("f:1", "invalid JSON"), "ignore", report)


def test_num_samples_keeps_the_first_valid_records(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["{", *[{"instruction": f"q{i}", "output": "a"} for i in range(5)]])
    spec = DatasetSpec("d", path, formatting="alpaca", num_samples=3)
    report = SkipReport()
    got = [s.messages[0].content for s in _read([spec, spec], "skip", report)]
    assert got == ["q0", "q1", "q2"] * 2
    assert report.counts == {"invalid JSON": 2}


def test_real_alpaca_demo_matches_the_file(llamafactory_data_dir):
    path = llamafactory_data_dir / "alpaca_en_demo.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    [spec] = resolve_datasets([str(path)], None, None, fmt="alpaca")
    records = list(parse_records(spec))
    assert len(records) == len(raw) == 999
    first = records[0]
    assert first.messages[0] == Message("user", "Describe a process of making crepes.")
    assert first.messages[1].content.startswith("Making crepes is an easy and delicious process!")
    for parsed, rec in zip(records, raw):
        prompt = "\n".join(x for x in (rec["instruction"], rec["input"]) if x)
        assert parsed.messages == [Message("user", prompt), Message("assistant", rec["output"])]


def test_real_v1_sft_and_glaive_demos(llamafactory_data_dir):
    [v1] = resolve_datasets([str(llamafactory_data_dir / "v1_sft_demo.jsonl")], None, None)
    records = list(parse_records(v1))
    assert len(records) == 500 and all(isinstance(s, Conversation) for s in records)
    assert records[0].messages[0] == Message("user", "hi")
    assert all(s.messages[-1].role == "assistant" and s.messages[-1].content for s in records)
    [glaive] = resolve_datasets([str(llamafactory_data_dir / "glaive_toolcall_en_demo.json")], None, None)
    records = list(parse_records(glaive))
    assert len(records) == 300 and all(isinstance(s, Conversation) and s.tools for s in records)
    roles = {m.role for s in records for m in s.messages}
    assert roles == {"user", "assistant", "function_call", "observation"}
    assert records[0].messages[3].content.startswith('{"name": "search_recipes"')


def test_auto_detects_per_file_in_a_folder(tmp_path, llamafactory_data_dir):
    """A folder of an alpaca .jsonl and a sharegpt .json (real demo data): each file is detected on its own."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    alpaca = json.loads((llamafactory_data_dir / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:50]
    _jsonl(folder / "a_alpaca.jsonl", alpaca)
    (folder / "b_sharegpt.json").write_bytes((llamafactory_data_dir / "glaive_toolcall_en_demo.json").read_bytes())
    report = SkipReport()
    records = _read(resolve_datasets([str(folder)], None, None), "skip", report)
    assert report.counts == {} and len(records) == 50 + 300
    assert records[0].messages[-1].content == alpaca[0]["output"]
    assert records[50].source.startswith(str(folder / "b_sharegpt.json"))
    assert any(m.role == "function_call" for s in records[50:] for m in s.messages)
    assert all(s.tools for s in records[50:])  # sharegpt's tools column read in the second file
    # an explicit format applies to every file: the other file's records are bad records, counted
    report = SkipReport()
    records = _read(resolve_datasets([str(folder)], None, None, "alpaca"), "skip", report)
    assert len(records) == 50 and report.counts == {"missing column": 300}
