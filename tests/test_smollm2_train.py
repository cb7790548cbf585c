"""The validation loss megapack reports is the loss a user computes with transformers on the same validation
conversations and loss masks: a real `megapack train` of SmolLM2-135M-Instruct (shards made with its own tokenizer
folder and `--template hf`) with `training.eval_at_start` (the validation before the first step), 2 processes, token
and sample reduction; the reference is LlamaForCausalLM on the token ids and masks read back from the shards, one
conversation at a time. The token run exports its trained model (`checkpoint.export_hf`): transformers loads it and
it answers through its chat template."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from train_helpers import base_config, launch, losses

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

# measured: |megapack - transformers| / transformers 2e-7 (token) and 2e-7 (sample), fp32 on 2 CPU processes
REL_TOL = 1e-5


def per_conversation_nll(hf_dir: Path, shards: Path, split: str) -> list[tuple[float, int]]:
    """(sum of the trained targets' NLL, trained targets) of each conversation of a split, by transformers."""
    import torch
    import transformers

    from megapack.data.packs.shards import ShardDataset

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out, ds = [], ShardDataset(shards, split)
    with torch.no_grad():
        for i in range(len(ds)):
            pack = ds[i]
            for a, n in zip(pack.cu_seqlens_padded[:-1], pack.real_lengths):
                ids = torch.as_tensor(np.asarray(pack.tokens[a:a + n], np.int64))[None]
                mask = torch.as_tensor(np.asarray(pack.loss_mask[a + 1:a + n], np.float64))
                nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].double(), ids[0, 1:],
                                                        reduction="none")
                out.append((float((nll * mask).sum()), int(mask.sum())))
    return out


@pytest.fixture(scope="module")
def runs(smollm2_dir, llamafactory_data_dir, tmp_path_factory):
    from megapack.cli import main

    w = tmp_path_factory.mktemp("smol_train")
    src = w / "alpaca_24.json"
    src.write_text(json.dumps(json.loads((llamafactory_data_dir / "alpaca_en_demo.json").read_text())[:24]))
    shards = w / "shards"
    assert main(["preprocess", "--input", str(src), "--format", "alpaca", "--tokenizer-model", str(smollm2_dir),
                 "--template", "hf", "--seq-length", "512", "--packing", "greedy", "--val-fraction", "0.25",
                 "--seed", "1", "--output-dir", str(shards), "--no-progress", "--workers", "1"]) == 0
    jobs = [{"config": base_config(smollm2_dir, shards, w / reduction,
                                   optimizer={"lr": 1e-4, "warmup_steps": 0},
                                   training={"train_steps": 1, "global_batch_size": 2, "loss_reduction": reduction,
                                             "eval_at_start": True},
                                   checkpoint={"dir": None, "export_hf": str(w / f"export_{reduction}")})}
            for reduction in ("token", "sample")]
    launch(2, jobs, w, "smol", timeout=900)
    return w, shards


def test_validation_loss_equals_transformers_on_the_same_conversations(runs, smollm2_dir):
    w, shards = runs
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["template"]["name"] == "hf"
    convs = per_conversation_nll(smollm2_dir, shards, "val")
    assert len(convs) >= 5 and sum(n for _, n in convs) > 200
    token = sum(s for s, _ in convs) / sum(n for _, n in convs)  # every trained token weighs the same
    sample = float(np.mean([s / n for s, n in convs if n]))  # every conversation weighs the same
    got_token = losses(w / "token", kind="valid", key="valid_loss")[0]  # before the first step
    got_sample = losses(w / "sample", kind="valid", key="valid_loss")[0]
    assert abs(got_token - token) / token <= REL_TOL, (got_token, token)
    assert abs(got_sample - sample) / sample <= REL_TOL, (got_sample, sample)
    assert 0.5 < token < 4  # a pretrained instruct model on alpaca answers, not a random one (~10.8)


def test_the_trained_export_loads_in_transformers_and_answers_with_its_chat_template(runs, smollm2_dir):
    import torch
    import transformers

    w, _ = runs
    out = w / "export_token"
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir / "chat_template.jinja").read_text()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    source = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    trained, before = model.state_dict(), source.state_dict()
    assert trained.keys() == before.keys() and len(before) == 273
    moved = max(float((trained[k] - before[k]).abs().max()) for k in before)
    assert moved > 1e-5  # one optimizer step at lr 1e-4 reached the exported weights
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(prompt["input_ids"][0]).endswith("<|im_start|>assistant\n")  # the ChatML template ran
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(answer[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
