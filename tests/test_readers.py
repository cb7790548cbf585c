"""File readers: sources, streaming, bad lines and unreadable files."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megapack.data.sources.conversation import BadRecord
from megapack.data.sources.readers import iter_json, iter_records, list_data_files
from megapack.errors import MegapackError


def _write(path, text: str | bytes):
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(path)


def test_jsonl_sources_bad_lines_and_blank_lines(tmp_path):
    path = _write(tmp_path / "d.jsonl",
                  '{"a": 1}\n\n{"a": 2,}\n{"a": "é"}\n'.encode() + b'{"a": "\xff"}\n' + b'[1, 2]\n')
    items = list(iter_records(path))
    assert items[0] == (f"{path}:1", {"a": 1})
    assert isinstance(items[1], BadRecord)
    assert (items[1].source, items[1].reason) == (f"{path}:3", "invalid JSON")  # line 2 is blank, not a record
    assert items[2] == (f"{path}:4", {"a": "é"})
    assert (items[3].source, items[3].reason) == (f"{path}:5", "invalid JSON")
    assert "UTF-8" in items[3].detail
    assert items[4] == (f"{path}:6", [1, 2])  # not an object: the format layer reports it
    assert len(items) == 5


def test_json_array_is_streamed_not_loaded_whole():
    records = [{"instruction": f"q{i}", "output": "x" * 200} for i in range(40_000)]
    data = json.dumps(records).encode()
    assert len(data) > 8_000_000

    class Counting(io.BytesIO):
        consumed = 0

        def read(self, size=-1):
            chunk = super().read(size)
            Counting.consumed += len(chunk)
            return chunk

    stream = iter_json(Counting(data), "big.json")
    assert next(stream) == ("big.json:1", records[0])
    assert Counting.consumed < 200_000, Counting.consumed  # a few buffers, not 8 MB
    assert next(stream) == ("big.json:2", records[1])
    rest = list(stream)
    assert len(rest) == 39_998 and rest[-1] == ("big.json:40000", records[-1])


def test_json_array_values_and_floats(tmp_path):
    path = _write(tmp_path / "a.json", '\ufeff  [ {"x": 1.5, "y": [1, {"z": null}]}, "str", {"x": true} ]')
    assert list(iter_records(path)) == [
        (f"{path}:1", {"x": 1.5, "y": [1, {"z": None}]}),
        (f"{path}:2", "str"),
        (f"{path}:3", {"x": True}),
    ]
    assert type(list(iter_records(path))[0][1]["x"]) is float


def test_json_file_holding_json_lines_is_accepted(tmp_path):
    # Hugging Face datasets (LLaMA-Factory's loader) reads JSON lines from a .json file too
    path = _write(tmp_path / "lines.json", '{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    items = list(iter_records(path))
    assert items[0] == (f"{path}:1", {"text": "a"})
    assert (items[1].source, items[1].reason) == (f"{path}:2", "invalid JSON")
    assert items[2] == (f"{path}:3", {"text": "c"})


def test_corrupt_json_array_fails_naming_file_and_record(tmp_path):
    path = _write(tmp_path / "bad.json", '[{"a": 1}, {"a": 2}, {"a": 3,, }, {"a": 4}]')
    stream = iter_records(path)
    assert [next(stream), next(stream)] == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2})]
    with pytest.raises(MegapackError) as err:
        next(stream)
    message = str(err.value)
    assert message.startswith(f"{path}: corrupt JSON array in record 3 ")
    assert "\n" not in message


def test_truncated_json_array_and_single_object_fail(tmp_path):
    truncated = _write(tmp_path / "cut.json", '[{"a": 1}, {"a": 2')
    with pytest.raises(MegapackError, match=r"cut\.json: corrupt JSON array in record 2"):
        list(iter_records(truncated))
    obj = _write(tmp_path / "obj.json", '{\n  "instruction": "x",\n  "output": "y"\n}\n')
    with pytest.raises(MegapackError, match=r"obj\.json: a single top-level JSON object is not a dataset"):
        list(iter_records(obj))
    assert list(iter_records(_write(tmp_path / "empty.json", "  \n"))) == []


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(MegapackError, match=r"nope\.jsonl: no such file"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    with pytest.raises(MegapackError, match=r"d\.xml: unsupported file type '\.xml'"):
        list(iter_records(_write(tmp_path / "d.xml", "<a/>")))
    with pytest.raises(MegapackError, match=r"missing_dir: no such file or directory"):
        list_data_files(str(tmp_path / "missing_dir"))


def test_parquet_rows_across_batches(tmp_path):
    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
             "system": None if i % 2 else f"s{i}"} for i in range(2500)]
    path = str(tmp_path / "d.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    items = list(iter_records(path))
    assert [s for s, _ in items] == [f"{path}:{i}" for i in range(1, 2501)]
    assert [r for _, r in items] == rows


def test_corrupt_parquet_fails(tmp_path):
    path = _write(tmp_path / "bad.parquet", b"PAR1 this is not parquet PAR1")
    with pytest.raises(MegapackError, match=r"bad\.parquet: unreadable parquet file"):
        list(iter_records(path))


def test_csv_txt_and_arrow(tmp_path):
    csv_path = _write(tmp_path / "d.csv", 'instruction,output\n"multi\nline",ok\nb,c,extra\n')
    items = list(iter_records(csv_path))
    assert items[0] == (f"{csv_path}:1", {"instruction": "multi\nline", "output": "ok"})
    assert (items[1].source, items[1].reason) == (f"{csv_path}:2", "malformed row")

    txt_path = _write(tmp_path / "d.txt", "first doc\r\nsecond doc\n")
    assert list(iter_records(txt_path)) == [(f"{txt_path}:1", {"text": "first doc"}),
                                            (f"{txt_path}:2", {"text": "second doc"})]

    table = pa.Table.from_pylist([{"text": "a"}, {"text": "b"}])
    arrow_path = str(tmp_path / "d.arrow")
    with pa.OSFile(arrow_path, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert list(iter_records(arrow_path)) == [(f"{arrow_path}:1", {"text": "a"}), (f"{arrow_path}:2", {"text": "b"})]


def test_directory_listing(tmp_path):
    for name in ("b.jsonl", "a.json", ".hidden"):
        _write(tmp_path / name, "")
    assert list_data_files(str(tmp_path)) == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    _write(tmp_path / "c.parquet", "")
    with pytest.raises(MegapackError, match="mixes file types"):
        list_data_files(str(tmp_path))


def test_directory_skips_documentation_and_the_registry(tmp_path):
    """LLaMA-Factory's data folder holds README.md, README_zh.md and dataset_info.json beside the data."""
    for name in ("README.md", "README_zh.md", "notes.markdown", "dataset_info.json", "b.jsonl", "a.json"):
        _write(tmp_path / name, "# docs\n" if name.endswith("md") else "")
    assert list_data_files(str(tmp_path)) == [str(tmp_path / "a.json"), str(tmp_path / "b.jsonl")]
    only_docs = tmp_path / "docs"
    only_docs.mkdir()
    _write(only_docs / "README.md", "# x\n")
    _write(only_docs / "dataset_info.json", "{}")
    with pytest.raises(MegapackError, match=r"docs: the folder contains no dataset files"):
        list_data_files(str(only_docs))
    # an unknown type among data files is still refused, not silently skipped
    _write(tmp_path / "c.xlsx", "")
    with pytest.raises(MegapackError, match=r"c\.xlsx: unsupported file type"):
        list_data_files(str(tmp_path))
    # a file given by name is read whatever its name
    assert list_data_files(str(tmp_path / "a.json")) == [str(tmp_path / "a.json")]


# ---- hostile records: bounded nesting depth and size ---------------------------------------------------------------

def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deep_nesting_is_a_bad_record_in_json_lines_and_json_arrays(tmp_path):
    """A record nested past the depth limit is a bad record with its file:line; its neighbours are read. Old code: a
    RecursionError traceback (.jsonl) and a record of unbounded memory (.json: ijson's prefixes grow with depth²)."""
    lines = _write(tmp_path / "d.jsonl", f'{{"a": 1}}\n{{"x": {_nested(100_000)}}}\n{{"a": 2}}\n')
    items = list(iter_records(lines))
    assert items[0] == (f"{lines}:1", {"a": 1}) and items[2] == (f"{lines}:3", {"a": 2}) and len(items) == 3
    assert (items[1].source, items[1].reason) == (f"{lines}:2", "too deeply nested")
    assert "JSON parser" in items[1].detail
    array = _write(tmp_path / "d.json", f'[{{"a": 1}}, {{"x": {_nested(3_000)}}}, {{"b": [[2]]}}]')
    items = list(iter_records(array))
    assert items[0] == (f"{array}:1", {"a": 1}) and items[2] == (f"{array}:3", {"b": [[2]]}) and len(items) == 3
    assert (items[1].source, items[1].reason) == (f"{array}:2", "too deeply nested")
    assert "than 100 levels (raise --max-record-depth)" in items[1].detail
    # exactly at the limit is kept, one past it is not (the record object itself is level 1)
    from megapack.data.sources.readers import ReadLimits

    limits = ReadLimits(max_depth=4)
    ok, deep = {"x": [[{"y": 1}]]}, {"x": [[[{"y": 1}]]]}
    for name, text in (("l.jsonl", f"{json.dumps(ok)}\n{json.dumps(deep)}\n"),
                       ("l.json", f"[{json.dumps(ok)}, {json.dumps(deep)}]")):
        got = list(iter_records(_write(tmp_path / name, text), limits))
        assert got[0][1] == ok and got[1].reason == "too deeply nested", (name, got)


def test_hostile_json_array_stays_in_bounded_memory(tmp_path):
    """400 KB of nested arrays (issue 21: 16 GB and the OOM killer) reads as one bad record in a bounded process."""
    import resource
    import subprocess
    import sys

    path = _write(tmp_path / "hostile.json", f'[{_nested(200_000)}, {{"a": 1}}]')
    # VmHWM: this process's own peak (ru_maxrss would include the forking pytest process's size)
    code = ("import re, sys\nfrom megapack.data.sources.readers import iter_records\n"
            "items = list(iter_records(sys.argv[1]))\n"
            "peak = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
            "print(items[0].reason, items[1][1], peak, sep='|')")
    limit = 1 << 30  # 1 GiB of address space past the interpreter's own: old code needed tens of GB
    run = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit * 2, limit * 2)))
    assert run.returncode == 0, run.stderr[-2000:]
    reason, kept, rss_kb = run.stdout.split("|")
    assert reason == "too deeply nested" and kept == "{'a': 1}" and int(rss_kb) < 400_000, run.stdout


def test_records_past_the_size_limit_are_bad_records_in_every_reader(tmp_path):
    """A record larger than --max-record-bytes is a bad record with its file:line in every format; a JSON line is
    never read whole into memory."""
    from megapack.data.sources.readers import ReadLimits, count_records

    limits = ReadLimits(max_bytes=100_000)
    big, small = "x" * 300_000, "y" * 10
    files = {
        "a.jsonl": _write(tmp_path / "a.jsonl", "\n".join(json.dumps({"text": t}) for t in (small, big, small)) + "\n"),
        "a.json": _write(tmp_path / "a.json", json.dumps([{"text": t} for t in (small, big, small)])),
        "a.txt": _write(tmp_path / "a.txt", f"{small}\n{big}\n{small}\n"),
        "a.csv": _write(tmp_path / "a.csv", f"text\n{small}\n{big}\n{small}\n"),
    }
    pq.write_table(pa.table({"text": [small, big, small]}), tmp_path / "a.parquet")
    files["a.parquet"] = str(tmp_path / "a.parquet")
    for name, path in files.items():
        items = list(iter_records(path, limits))
        assert [i[1]["text"] for i in (items[0], items[2])] == [small, small], name
        assert (items[1].source, items[1].reason) == (f"{path}:2", "record too large"), (name, items[1])
        assert "--max-record-bytes" in items[1].detail, name
        assert count_records(path, limits) == 3, name
    # the default limit keeps the 300 KB record (csv's own 128 KiB field limit must not apply)
    for name, path in files.items():
        assert [len(i[1]["text"]) for i in iter_records(path)] == [10, 300_000, 10], name
