"""`megapack demo` (what `bash examples/quickstart.sh` runs), shrunk: two packings trained in one torchrun launch."""
from __future__ import annotations

import json
import math
import re

import pytest
import yaml

pytestmark = pytest.mark.multiprocess  # `megapack demo` trains in a 2-process torchrun launch


def test_demo_trains_every_arm_in_one_launch(shrunk_demo):
    workdir, out = shrunk_demo
    rows = json.loads((workdir / "table3.json").read_text())["runs"]
    assert [r["packing"] for r in rows] == ["padding", "greedy"]
    # the console shows rank 0's per-step lines, with elapsed time and ETA
    steps = [line for line in out.splitlines() if re.match(r"  step \d+/\d+ loss ", line)]
    assert len(steps) == sum(r["total_steps"] for r in rows), out
    assert all(" elapsed " in line and " eta " in line for line in steps)
    log = (workdir / "train" / "train.log").read_text()
    assert log.count("training ") >= 2 and f"training {rows[0]['total_steps']} steps on" in out
    for row in rows:
        meta = json.loads((workdir / "shards" / row["packing"] / "meta.json").read_text())
        train = meta["splits"]["train"]
        # one epoch (rounded up to whole steps of 8 sequences, the default) over the same conversations in both arms
        assert row["total_steps"] == math.ceil(train["num_packs"] / 8) and row["epochs"] >= 1.0
        conversations = row["conversations_per_s"] * row["total_training_time_s"]
        assert train["num_conversations"] <= round(conversations) <= 2 * train["num_conversations"]
        # a few steps from random weights: the token-mean cross-entropy is still about ln(vocabulary size)
        assert abs(row["final_loss"] - math.log(128256)) < 0.5
    assert rows[1]["total_steps"] < rows[0]["total_steps"]
    ratio = rows[1]["conversations_per_s"] / rows[0]["conversations_per_s"]  # the table's one-line conclusion
    assert (f"packing (greedy) trained the same conversations {ratio:.1f}x faster than padding; its loss differs "
            f"because it took fewer optimizer steps ({rows[1]['total_steps']} against {rows[0]['total_steps']})") in out
    # the saved configs record what ran: no `auto` left (CPU run: fp32, sdpa, synchronous checkpoints)
    for packing in ("padding", "greedy"):
        run = workdir / "train" / packing
        for path in (run / "config.yaml", run / "checkpoints" / "config.yaml"):
            assert "auto" not in path.read_text(), path
        resolved = yaml.safe_load((run / "checkpoints" / "config.yaml").read_text())
        assert resolved["training"]["precision"] == "fp32" and resolved["model"]["attention_backend"] == "sdpa"
        assert resolved["checkpoint"]["async_save"] is False and resolved["derived"]["total_steps"] >= 1  # packing needs fewer steps for the same conversations
