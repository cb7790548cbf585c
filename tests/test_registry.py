"""LLaMA-Factory dataset_info.json registry: the real demo registry, the seed paper's entry, and refusals."""
from __future__ import annotations

import json

import pytest

from megapack.data.sources.conversation import BadRecord, Conversation, Document, Message
from megapack.data.sources.formats import parse_records
from megapack.data.sources.registry import load_registry, resolve_datasets
from megapack.errors import MegapackError

# Entries of LLaMA-Factory 0.9.5's data/dataset_info.json that have a local file but are not text SFT data.
NOT_SFT = {
    "dpo_en_demo": "a preference dataset", "dpo_zh_demo": "a preference dataset", "kto_en_demo": "a KTO dataset",
    "mllm_demo": "multimodal", "mllm_audio_demo": "multimodal", "mllm_video_demo": "multimodal",
    "mllm_video_audio_demo": "multimodal",
}


def _registry(tmp_path, entries: dict) -> str:
    (tmp_path / "dataset_info.json").write_text(json.dumps(entries), encoding="utf-8")
    return str(tmp_path)


def test_every_local_entry_of_the_real_registry(llamafactory_data_dir):
    registry = load_registry(str(llamafactory_data_dir))
    local = [name for name, entry in registry.items() if "file_name" in entry and not any(
        k in entry for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"))]
    assert len(registry) == 104 and len(local) == 14
    counts = {}
    for name in local:
        if name in NOT_SFT:
            with pytest.raises(MegapackError, match=f"dataset {name!r} is {NOT_SFT[name]}"):
                resolve_datasets(None, [name], str(llamafactory_data_dir))
            continue
        [spec] = resolve_datasets(None, [name], str(llamafactory_data_dir))
        items = list(parse_records(spec))
        assert not [b for b in items if isinstance(b, BadRecord)], name
        counts[name] = (spec.formatting, len(items), type(items[0]).__name__)
    assert counts == {
        "identity": ("alpaca", 91, "Conversation"),
        "alpaca_en_demo": ("alpaca", 999, "Conversation"),
        "alpaca_zh_demo": ("alpaca", 1000, "Conversation"),
        "glaive_toolcall_en_demo": ("sharegpt", 300, "Conversation"),
        "glaive_toolcall_zh_demo": ("sharegpt", 300, "Conversation"),
        "wiki_demo": ("text", 30, "Document"),
        "c4_demo": ("text", 300, "Document"),
    }


def test_real_alpaca_and_c4_entries(llamafactory_data_dir):
    specs = resolve_datasets(None, ["alpaca_en_demo,c4_demo"], str(llamafactory_data_dir))
    assert [s.name for s in specs] == ["alpaca_en_demo", "c4_demo"]
    alpaca = list(parse_records(specs[0]))
    assert alpaca[0].source == f"{llamafactory_data_dir}/alpaca_en_demo.json:1"
    assert alpaca[0].messages[0] == Message("user", "Describe a process of making crepes.")
    assert alpaca[0].system is None
    docs = list(parse_records(specs[1]))
    assert all(isinstance(d, Document) for d in docs)
    assert docs[0].text.startswith("Don’t think you need all the bells and whistles? No problem.")
    assert docs[-1].source == f"{llamafactory_data_dir}/c4_demo.jsonl:300"


def test_seed_paper_wildchat_entry(tmp_path):
    directory = _registry(tmp_path, {"wildchat_gpt": {
        "file_name": "wildchat_gpt.json", "formatting": "sharegpt", "columns": {"messages": "conversations"}}})
    records = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                           {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}],
         "system": "ignored: the entry names no system column"},
        {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "human", "value": "unanswered"}]},
    ]
    (tmp_path / "wildchat_gpt.json").write_text(json.dumps(records, indent=1), encoding="utf-8")
    [spec] = resolve_datasets(None, ["wildchat_gpt"], directory)
    assert (spec.formatting, spec.columns["messages"], spec.columns["system"]) == ("sharegpt", "conversations", None)
    first, second, bad = parse_records(spec)
    assert first == Conversation([Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "2+2?"),
                                  Message("assistant", "4")], source=f"{tmp_path}/wildchat_gpt.json:1")
    assert (second.system, second.messages) == ("Be terse.", [Message("user", "Q"), Message("assistant", "A")])
    assert (bad.source, bad.reason) == (f"{tmp_path}/wildchat_gpt.json:3", "ends on user turn")


def test_openai_entry_via_tags_folder_and_num_samples(tmp_path):
    folder = tmp_path / "parts"
    folder.mkdir()
    for i in range(2):
        line = {"messages": [{"role": "system", "content": f"s{i}"}, {"role": "user", "content": f"u{i}"},
                             {"role": "assistant", "content": f"a{i}"}], "sys": "column"}
        (folder / f"{i}.jsonl").write_text(json.dumps(line) + "\n", encoding="utf-8")
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "system_tag": "system"}
    directory = _registry(tmp_path, {
        "oa": {"file_name": "parts", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags},
        "oa1": {"file_name": "parts", "formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": tags,
                "num_samples": 1},
        "oa2": {"file_name": "parts", "formatting": "openai", "columns": {"system": "sys"}},
    })
    specs = resolve_datasets(None, ["oa", "oa1", "oa2"], directory)
    records = [s for spec in specs for s in parse_records(spec)]
    assert [(s.system, s.messages[1].content, s.source.rsplit("/", 1)[1]) for s in records] == [
        ("s0", "a0", "0.jsonl:1"), ("s1", "a1", "1.jsonl:1"), ("s0", "a0", "0.jsonl:1"),
        ("s0", "a0", "0.jsonl:1"), ("s1", "a1", "1.jsonl:1")]  # a leading system turn wins over the column


def test_refusals_name_the_entry(tmp_path):
    (tmp_path / "d.json").write_text("[]", encoding="utf-8")
    directory = _registry(tmp_path, {
        "hub": {"hf_hub_url": "org/data", "file_name": "d.json"},
        "script": {"script_url": "x"},
        "pairs": {"file_name": "d.json", "ranking": True},
        "kto": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"kto_tag": "label"}},
        "images": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"images": "images"}},
        "weird": {"file_name": "d.json", "formatting": "xml"},
        "gone": {"file_name": "missing.json"},
        "listy": {"file_name": "d.json", "formatting": "sharegpt", "tags": {"user_tag": ["human", "user"]}},
        **{f"alpaca_{i}": {"file_name": "d.json"} for i in range(7)},
    })
    where = f"{tmp_path}/dataset_info.json"
    expected = {
        "hub": f"{where}: dataset 'hub' is hosted remotely (hf_hub_url='org/data'); hub datasets are not available "
               "offline",
        "script": f"{where}: dataset 'script' is hosted remotely (script_url='x')",
        "pairs": f"{where}: dataset 'pairs' is a preference dataset (ranking: true); megapack does SFT only",
        "kto": f"{where}: dataset 'kto' is a KTO dataset",
        "images": f"{where}: dataset 'images' is multimodal (columns.images)",
        "weird": f"{where}: dataset 'weird' has formatting 'xml'; expected one of alpaca, sharegpt, openai, text",
        "gone": f"{where}: dataset 'gone': file_name {tmp_path}/missing.json does not exist",
        "listy": f"{where}: dataset 'listy': user_tag=['human', 'user']; expected a column or tag name (a string)",
    }
    for name, message in expected.items():
        with pytest.raises(MegapackError) as err:
            resolve_datasets(None, [name], directory)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(MegapackError) as err:
        resolve_datasets(None, ["alpaka_3"], directory)
    assert str(err.value).startswith(f"dataset 'alpaka_3' is not in {where} (did you mean: alpaca_3, alpaca_")
    with pytest.raises(MegapackError) as err:
        resolve_datasets(None, ["zzz"], directory)
    known = "alpaca_0, alpaca_1, alpaca_2, alpaca_3, alpaca_4 and 10 more"
    assert str(err.value) == f"dataset 'zzz' is not in {where} (known: {known})"


def test_bad_registry_and_arguments(tmp_path):
    with pytest.raises(MegapackError, match=f"{tmp_path}/dataset_info.json: no such file"):
        resolve_datasets(None, ["x"], str(tmp_path))
    (tmp_path / "dataset_info.json").write_text('{"a": {"file_name": "x.json",}}', encoding="utf-8")
    with pytest.raises(MegapackError, match=r"dataset_info.json: invalid JSON at line 1 column 30 \(Expecting prop"):
        load_registry(str(tmp_path))
    with pytest.raises(MegapackError, match="no dataset given"):
        resolve_datasets(None, [], None)
    with pytest.raises(MegapackError, match="format 'csv' is not supported"):
        resolve_datasets([str(tmp_path)], None, None, fmt="csv")
    with pytest.raises(MegapackError, match=f"{tmp_path}/nope.jsonl: no such file or directory"):
        resolve_datasets([str(tmp_path / "nope.jsonl")], None, None)


def test_prompt_only_entry_is_text_only_without_responses(tmp_path):
    (tmp_path / "pt.jsonl").write_text('{"content": "a document"}\n', encoding="utf-8")
    (tmp_path / "qa.jsonl").write_text('{"question": "why?", "output": "because"}\n', encoding="utf-8")
    directory = _registry(tmp_path, {"pt": {"file_name": "pt.jsonl", "columns": {"prompt": "content"}},
                                     "qa": {"file_name": "qa.jsonl", "columns": {"prompt": "question"}}})
    pt, qa = resolve_datasets(None, ["pt", "qa"], directory)
    assert (pt.formatting, list(parse_records(pt))) == ("text", [Document("a document", f"{tmp_path}/pt.jsonl:1")])
    assert (qa.formatting, [s.messages for s in parse_records(qa)]) == (
        "alpaca", [[Message("user", "why?"), Message("assistant", "because")]])
