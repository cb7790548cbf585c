"""Shard format v2: the trainer takes real segment lengths from the shards, never from pad tokens.

A SentencePiece (Mistral) llama2-template case where every conversation ends in `</s>` with loss mask 0 — two-turn
conversations with `mask_history`, truncated right after the first answer's `</s>` — which is exactly the pad id
(SentencePiece models pad with EOS). Packed (greedy) and one-per-pack (padding) shards, with and without
`pad_to_multiple 16`, train on the same conversations: the trainer sees the same segment lengths and losses.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from train_helpers import base_config, launch, losses, make_tiny_hf

pytestmark = pytest.mark.multiprocess  # a torchrun launch

ARMS = [("greedy", 1), ("greedy", 16), ("padding", 1), ("padding", 16)]


def _conversations(data_dir, count: int):
    from megapack.data.sources.conversation import Conversation, Message

    records = json.loads((data_dir / "alpaca_en_demo.json").read_text())[: 2 * count]
    out = []
    for a, b in zip(records[0::2], records[1::2]):
        turns = [("user", a["instruction"]), ("assistant", a["output"]), ("user", b["instruction"]),
                 ("assistant", b["output"])]
        out.append(Conversation([Message(role, text[:200] or "-") for role, text in turns]))
    return out


def _eos_ending_samples(data_dir, sp_model, count: int = 12) -> tuple[list, int]:
    """(ids, mask) pairs that end in `</s>` with mask 0, and the pad id (= EOS)."""
    from megapack.data.render.templates import TemplateOptions, get_template
    from megapack.data.render.tokenizers import load_tokenizer

    tok = load_tokenizer(sp_model)
    template, options = get_template("llama2"), TemplateOptions(mask_history=True)
    samples = []
    for conv in _conversations(data_dir, count):
        ids, mask = template.encode(conv, tok, options)
        cut = int(np.flatnonzero(ids == tok.eos_id)[0]) + 1  # right after the first answer's </s>
        samples.append((ids[:cut].astype(np.int64), mask[:cut]))
    assert tok.pad_id == tok.eos_id
    assert all(ids[-1] == tok.pad_id and mask[-1] == 0 for ids, mask in samples)
    return samples, tok.pad_id


@pytest.fixture(scope="module")
def arms(tmp_path_factory, llamafactory_data_dir, mistral_sp_model_path):
    from megapack.data.packs.writer import RecordStore, write_shard_dir

    w = tmp_path_factory.mktemp("segments")
    hf = make_tiny_hf(w / "hf")
    samples, pad_id = _eos_ending_samples(llamafactory_data_dir, mistral_sp_model_path)
    jobs, runs = [], {}
    for packing, k in ARMS:
        shards = w / f"{packing}{k}"
        meta = write_shard_dir(RecordStore.from_encoded(samples), shards, seq_length=256, packing=packing,
                               pad_to_multiple=k, vocab_size=32000, pad_id=pad_id, seed=3)
        packs = meta["num_packs"]  # one step = every conversation (the loss is then independent of packing)
        cfg = base_config(hf, shards, w / f"run_{packing}{k}", data={"valid_split": None},
                          optimizer={"lr": 1e-3, "warmup_steps": 0, "decay_style": "constant"},
                          training={"global_batch_size": packs, "train_steps": 2})
        jobs.append({"config": cfg})
        runs[(packing, k)] = (w / f"run_{packing}{k}", meta)
    launch(1, jobs, w, "segments")
    return samples, runs


def test_segment_lengths_and_losses_do_not_depend_on_packing_or_padding(arms):
    samples, runs = arms
    real = sum(len(ids) for ids, _ in samples)
    steps = {arm: {s: r for s, r in _records(run).items()} for arm, (run, _meta) in runs.items()}
    for arm, recs in steps.items():
        for rec in recs.values():
            # every conversation's closing </s> (= the pad id, mask 0) is a real token of its segment
            assert rec["real_tokens"] == real, arm
            assert rec["conversations"] == len(samples), arm
    padded16 = runs[("greedy", 16)][1]
    assert padded16["num_padding_tokens"] > 0  # the K=16 shards really carry segment padding
    ref = losses(runs[("greedy", 1)][0])
    for arm, (run, _meta) in runs.items():
        got = losses(run)
        assert sorted(got) == [1, 2]
        for step in (1, 2):
            assert got[step] == pytest.approx(ref[step], rel=2e-6), (arm, step)


def _records(run_dir) -> dict[int, dict]:
    from megapack.training.run.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")
