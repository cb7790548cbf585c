"""End to end on the real LLaMA-Factory demo data with the real LLaMA-3 tokenizer: every packing reproduces the
template's encodings exactly; shards are byte-identical for any worker or partition count; a killed run never
looks complete and a rerun finishes it; bad arguments give one-line errors and leave nothing behind."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megapack.cli import main
from megapack.data.pipeline.preprocess import PreprocessConfig, run_preprocess
from megapack.data.packs.shards import ShardDataset

ROOT = Path(__file__).resolve().parents[1]
BOS = 128000
DATASETS = ["alpaca_en_demo", "glaive_toolcall_en_demo", "identity"]
LLAMA3_VOCAB = "vocab:2b6dff733d9c48f89f6efd2e9c62e69238bb03ca9c50345b0c7a00a48b35196b"  # as in test_tokenizers.py


@pytest.fixture(scope="module")
def reference(llama3_tokenizer, llamafactory_data_dir):
    """(ids, mask) of every demo conversation, straight from the template (the expected content of the shards)."""
    from megapack.data.sources.formats import parse_records
    from megapack.data.sources.registry import resolve_datasets
    from megapack.data.render.templates import TemplateOptions, get_template
    from megapack.data.sources.conversation import BadRecord

    template, opts = get_template("llama3"), TemplateOptions()
    records = [r for spec in resolve_datasets(None, DATASETS, str(llamafactory_data_dir)) for r in parse_records(spec)]
    assert not [r for r in records if isinstance(r, BadRecord)]  # --on-error fail would stop on none of them
    return [template.encode(r, llama3_tokenizer, opts) for r in records]


def config(tmp_path, data_dir, tok, name, **kw) -> PreprocessConfig:
    base = dict(output_dir=str(tmp_path / name), tokenizer_model=str(tok), datasets=DATASETS,
                dataset_dir=str(data_dir), seq_length=512, progress=False)
    return PreprocessConfig(**(base | kw))


def segments(ds: ShardDataset):
    for i in range(len(ds)):
        p = ds[i]
        for a, b, n in zip(p.cu_seqlens_padded[:-1], p.cu_seqlens_padded[1:], p.real_lengths):
            yield p.tokens[a:b], p.loss_mask[a:b], int(n)


@pytest.mark.parametrize("packing", ["padding", "random", "greedy", "bfd"])
def test_real_demo_data_all_packings(tmp_path, llamafactory_data_dir, llama3_tokenizer_path, reference, packing):
    K = 8 if packing in ("greedy", "bfd") else 1
    L = 512
    meta = run_preprocess(config(tmp_path, llamafactory_data_dir, llama3_tokenizer_path, packing,
                                 packing=packing, pad_to_multiple=K, val_fraction=0.05 if packing == "bfd" else 0.0))
    n = len(reference)
    assert n == 999 + 300 + 91 and meta["num_records"] == n and meta["skipped"] == {}
    assert meta["tokenizer_identity"] == LLAMA3_VOCAB and meta["dtype"] == "int32"
    for key in ("format_version", "num_conversations", "num_tokens", "num_trained_tokens", "num_packs", "seq_length",
                "packing", "seed", "pad_to_multiple", "lower_bound_packs", "packing_efficiency", "truncated", "dropped",
                "skipped", "tokenizer_identity", "template", "vocab_size", "sha256"):
        assert key in meta, key
    cut = None if packing == "random" else L  # only random keeps over-long conversations whole (split across rows)
    want = Counter((tuple(ids[:cut].tolist()), tuple(mask[:cut].tolist())) for ids, mask in reference)
    got = Counter()
    splits = ["train", "val"] if "val" in meta["splits"] else ["train"]
    for split in splits:
        ds = ShardDataset(tmp_path / packing, split)
        assert len(ds) == meta["splits"][split]["num_packs"]
        if packing == "random":
            stream = np.concatenate([ds[i].tokens for i in range(len(ds))])
            masks = np.concatenate([ds[i].loss_mask for i in range(len(ds))])
            starts = np.flatnonzero(stream == BOS).tolist() + [len(stream)]
            assert starts[0] == 0 and all(len(ds[i].tokens) == L for i in range(len(ds) - 1))
            for a, b in zip(starts[:-1], starts[1:]):
                got[(tuple(stream[a:b].tolist()), tuple(masks[a:b].tolist()))] += 1
            # each pack says whether it opens with the rest of a cut conversation (llama3: no BOS there)
            packs = [ds[i] for i in range(len(ds))]
            assert [p.continues for p in packs] == [int(p.tokens[0]) != BOS for p in packs]
            assert 0 < sum(p.continues for p in packs) < len(packs)
            assert sum(len(p.cu_seqlens) - 1 - p.continues for p in packs) == n
            continue
        assert not any(ds[i].continues for i in range(len(ds)))
        for toks, mask, real in segments(ds):  # real lengths as recorded by the shards (format v2)
            assert real == len(toks) or (K > 1 and len(toks) - real < K)
            assert (toks[real:] == meta["pad_id"]).all() and (mask[real:] == 0).all() and len(toks) % K == 0
            got[(tuple(toks[:real].tolist()), tuple(mask[:real].tolist()))] += 1
            assert len(toks) <= L
    if packing != "random":
        # truncated conversations keep their first L tokens
        assert meta["truncated"] + meta.get("splits", {}).get("val", {}).get("truncated", 0) == sum(
            len(ids) > L for ids, _ in reference)
    assert got == want
    if packing in ("greedy", "bfd"):
        assert meta["num_packs"] <= meta["lower_bound_packs"] * 1.01 + 1 and meta["packing_efficiency"] > 0.95
    if packing == "padding":
        assert meta["num_packs"] == n


@pytest.mark.multiprocess
def test_workers_and_partitions_give_identical_bytes(tmp_path, llamafactory_data_dir, llama3_tokenizer_path):
    one = run_preprocess(config(tmp_path, llamafactory_data_dir, llama3_tokenizer_path, "w1", workers=1))
    three = run_preprocess(config(tmp_path, llamafactory_data_dir, llama3_tokenizer_path, "w3", workers=3))
    # three partitions tokenized one by one (as a Slurm array would), then one pack step
    for i in range(3):
        part = run_preprocess(config(tmp_path, llamafactory_data_dir, llama3_tokenizer_path, "p3",
                                     num_partitions=3, partition_index=i))
        assert part["records"] > 0
    assert not (tmp_path / "p3" / "meta.json").exists()
    parts = run_preprocess(config(tmp_path, llamafactory_data_dir, llama3_tokenizer_path, "p3", num_partitions=3,
                                  workers=2))
    assert parts["reused_partitions"] == 3
    assert one["sha256"] == three["sha256"] == parts["sha256"]
    for name in one["sha256"]:
        data = (tmp_path / "w1" / name).read_bytes()
        assert data == (tmp_path / "w3" / name).read_bytes() == (tmp_path / "p3" / name).read_bytes()
    assert not (tmp_path / "p3" / ".work").exists()


def test_killed_run_is_never_complete_and_resumes(tmp_path, llama3_tokenizer_path):
    rng = np.random.default_rng(0)
    words = np.array("the quick brown fox jumps over a lazy dog while packing many tokens".split())
    data = tmp_path / "docs.jsonl"
    with open(data, "w") as f:
        for _ in range(8000):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(5, 120))))}) + "\n")
    cmd = [sys.executable, str(ROOT / "tools" / "preprocess_data.py"), "--input", str(data), "--template", "plain",
           "--tokenizer-model", str(llama3_tokenizer_path), "--seq-length", "1024", "--num-partitions", "4",
           "--no-progress"]
    out = tmp_path / "out"
    proc = subprocess.Popen([*cmd, "--output-dir", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not list((out / ".work").glob("part-00000-of-00004/part.json")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "meta.json").exists()
    with pytest.raises(Exception, match="not a finished megapack shard directory"):
        ShardDataset(out)
    resumed = subprocess.run([*cmd, "--output-dir", str(out)], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "reused partitions" in resumed.stdout
    fresh = subprocess.run([*cmd, "--output-dir", str(tmp_path / "fresh")], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    a = json.loads((out / "meta.json").read_text())
    b = json.loads((tmp_path / "fresh" / "meta.json").read_text())
    assert a["sha256"] == b["sha256"] and a["num_conversations"] == 8000
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())


def test_bad_arguments_one_line_and_nothing_left(tmp_path, llama3_tokenizer_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello world"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": \n{"nope": 1}\n')
    blocker = tmp_path / "file"
    blocker.write_text("x")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    base = ["preprocess", "--tokenizer-model", str(llama3_tokenizer_path), "--template", "plain", "--no-progress"]
    cases = [
        (["--input", str(good), "--seq-length", "0"], "--seq-length 0", tmp_path / "o1"),
        (["--input", str(good), "--workers", "0"], "--workers 0", tmp_path / "o2"),
        (["--input", str(good), "--packing", "knapsack"], "--packing 'knapsack'", tmp_path / "o3"),
        (["--input", str(good), "--seq-length", "100", "--pad-to-multiple", "8"], "--pad-to-multiple 8", tmp_path / "o4"),
        (["--input", str(bad)], "no conversations left to pack", tmp_path / "o5"),
        (["--input", str(good)], "not writable", blocker / "sub"),
        (["--input", str(good)], "not empty; pass --overwrite", full),
        (["--input", str(tmp_path / "missing.jsonl")], "missing.jsonl", tmp_path / "o6"),
    ]
    for extra, fragment, out in cases:
        code = main([*base, *extra, "--output-dir", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 1 and fragment in err and "\n" not in err, (extra, err)
        if out == full:
            assert [p.name for p in full.iterdir()] == ["keep.txt"]
        else:
            assert not out.exists(), extra
    assert main([*base, "--input", str(good), "--output-dir", str(full), "--overwrite"]) == 0
    assert (full / "meta.json").exists() and (full / "keep.txt").read_text() == "mine"
    assert main([*base, "--input", str(good), "--output-dir", str(full)]) == 1
    assert "already holds finished shards" in capsys.readouterr().err


def test_progress_totals_match_the_records_each_partition_reads(tmp_path, llamafactory_data_dir):
    """The tokenizing bar's total: records counted cheaply per file, then the share each partition owns."""
    from megapack.data.pipeline.partitions import owned_count, owned_records
    from megapack.data.sources.readers import count_records, iter_records

    for n in (0, 1, 255, 256, 257, 1000, 2049):
        for parts in (1, 2, 3, 4):
            counts = [owned_count(n, i, parts) for i in range(parts)]
            assert counts == [sum(1 for _ in owned_records(range(n), i, parts)) for i in range(parts)]
            assert sum(counts) == n
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a"}\n\nnot json\n{"text": "b"}\n')
    for path in (llamafactory_data_dir / "alpaca_en_demo.json", llamafactory_data_dir / "c4_demo.jsonl", mixed):
        assert count_records(str(path)) == sum(1 for _ in iter_records(str(path))) > 0, path
