"""The study in miniature on real weights (`megapack demo --model smollm2`), shrunk: SmolLM2 fine-tuned with every
packing and the contaminated arm in one launch, each arm validated and scored on the local tasks, and the report."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest

from megapack import demo_quality
ARMS = ["padding", "bfd", demo_quality.CONTAMINATED]  # a packed arm and the contaminated one beside padding


def test_generated_chats_never_hold_a_task_question():
    task = demo_quality.task_questions()
    assert len(task) == 110  # the shipped task's 10 few-shot and 100 test questions
    exclude = set(task)
    valid = demo_quality.arithmetic_chats(40, 1, exclude)
    train = demo_quality.arithmetic_chats(400, 2, exclude)
    asked = [[m["content"] for m in c["messages"][::2]] for c in (*valid, *train)]
    flat = [q for chat in asked for q in chat]
    assert len(flat) == len(set(flat)) and not set(flat) & task  # no repeat, no task item, train/valid disjoint
    assert all(q.startswith("What is ") for q in flat)
    assert 0.6 < sum(len(q) == 1 for q in asked) / len(asked) < 0.9  # mostly single-turn, some multi-turn
    for chat in train[:50]:
        for user, answer in zip(chat["messages"][::2], chat["messages"][1::2]):
            a, op, b = user["content"].removeprefix("What is ").removesuffix("?").split()
            assert int(answer["content"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
    # deterministic: the same seed and exclusions give the same chats
    assert demo_quality.arithmetic_chats(40, 1, set(task)) == valid


@pytest.fixture(scope="module")
def miniature(tmp_path_factory, smollm2_dir, llamafactory_data_dir) -> tuple[Path, str]:
    """The miniature with tiny numbers through the command line (the quickstart's `--model smollm2`)."""
    pytest.importorskip("lm_eval")
    from megapack.cli import main

    workdir = tmp_path_factory.mktemp("mini") / "mini"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--model", "smollm2", "--workdir", str(workdir), "--num-samples", "2",
                     "--arithmetic", "40", "--valid-arithmetic", "4", "--seq-length", "256",
                     "--eval-limit", "4", "--packings", "padding,bfd"]) == 0
    return workdir, printed.getvalue()


@pytest.mark.multiprocess
def test_miniature_reports_every_arm(miniature, smollm2_dir):
    workdir, out = miniature
    quality = json.loads((workdir / "quality.json").read_text())
    assert list(quality["runs"]) == ARMS and list(quality["scores"]) == ARMS
    for scores in [quality["base"], *quality["scores"].values()]:
        assert set(scores) == set(demo_quality.TASKS) and all(0.0 <= v <= 1.0 for v in scores.values())
    runs = quality["runs"]
    for arm in ARMS:
        assert math.isfinite(runs[arm]["final_valid_loss"]) and 0 < runs[arm]["final_valid_loss"] < 5
        # each arm was scored on its own exported model, with the same settings as the base model
        record = json.loads((workdir / "train" / arm / "eval" / "local_tasks" / "eval.json").read_text())
        assert record["model"]["path"] == str((workdir / "train" / arm / "hf").resolve())
        assert record["settings"]["limit"] == 4.0 and record["lm_eval"]["n-samples"]
    # same conversations in every arm: the packed arms took fewer steps than padding
    assert all(runs[a]["total_steps"] < runs["padding"]["total_steps"] for a in ARMS[1:])
    # the same held-out validation set for every arm; the contaminated arm differs from bfd only by its attention
    resolved = {a: (workdir / "train" / a / "config.yaml").read_text() for a in ("bfd", demo_quality.CONTAMINATED)}
    assert resolved["bfd"].replace("cross_sample_attention: false", "cross_sample_attention: true") == \
        resolved[demo_quality.CONTAMINATED].replace("/bfd-cross", "/bfd")
    report = (workdir / "report" / "miniature.md").read_text()
    assert "## Quality" in report and "## Time" in report
    # the base row's validation loss: the first arm's validation before its first step (nobody else validates then)
    first = [json.loads(line) for line in (workdir / "train" / "padding" / "metrics.jsonl").read_text().splitlines()]
    at_start = [r["valid_loss"] for r in first if r.get("kind") == "valid" and r["step"] == 0]
    assert at_start == [quality["base_valid_loss"]] and 0 < at_start[0] < 5
    assert f"| base model (before) | {at_start[0]:.4f} |" in report
    assert not any(r.get("kind") == "valid" and r["step"] == 0
                   for r in map(json.loads, (workdir / "train" / "bfd" / "metrics.jsonl").read_text().splitlines()))
    for arm in ARMS:
        assert f"| {arm} | {runs[arm]['final_valid_loss']:.4f} |" in report
    assert f"| {quality['base']['megapack_arithmetic']:.3f} |" in report and "report: " in out
    # `megapack report` finds the same scores in the runs' eval/ folders: its Table 1 against the padding arm
    runs_report = (workdir / "report" / "report.md").read_text()
    assert "padding (baseline)" in runs_report
    score = quality["scores"]["bfd"]["megapack_arithmetic"] - quality["scores"]["padding"]["megapack_arithmetic"]
    assert f"({100 * score:+.1f})" in runs_report
