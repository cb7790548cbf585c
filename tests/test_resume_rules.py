"""What is saved is what ran: resuming with other optimizer settings or another length applies them from the resumed
step (said in one line), the saved config says so, and checkpoints carry their model's tokenizer files to Hugging
Face. One one-process launch of the tiny model: each case trains 3 of 6 steps at lr 0.003, is stopped by SIGUSR1
(checkpoint at step 3), then resumes with the case's changes."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train_helpers import base_config, launch, losses, make_demo_shards, make_tiny_hf

pytestmark = pytest.mark.multiprocess  # one torchrun launch

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = Path(__file__).parent / "data" / "chat_templates" / "llama3.1-instruct"
START = {"lr": 0.003, "min_lr": 0.0, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
         "clip_grad": 1.0, "warmup_steps": 1, "warmup_ratio": None, "decay_style": "cosine"}  # OptimizerConfig's order
CASES = {
    "optimizer": {"optimizer": {"lr": 0.0003, "min_lr": 3e-5, "weight_decay": 0.1, "clip_grad": 0.5, "beta2": 0.99,
                                "eps": 1e-6}},
    "warmup": {"optimizer": {"warmup_steps": 5}},
    "linear": {"optimizer": {"decay_style": "linear"}},
    "constant": {"optimizer": {"decay_style": "constant"}},
    "steps": {"training": {"train_steps": 10}},
    "same": {},
}


def expected_lr(opt: dict, total: int, step: int) -> float:
    """lr of step `step` (1-based): megatron's OptimizerParamScheduler at num_steps = step - 1, warmup from
    lr / (W + 1) (megapack's init_lr), decay over max(total, W + 1) steps."""
    warm = min(opt["warmup_steps"], total) if opt["warmup_steps"] is not None \
        else int(round(opt["warmup_ratio"] * total)) if opt["warmup_ratio"] is not None else 0
    decay, n, top, low = max(total, warm + 1), step - 1, opt["lr"], opt["min_lr"]
    if warm and n <= warm:
        return top * (n + 1) / (warm + 1)
    if opt["decay_style"] == "constant":
        return top
    if n > decay:
        return low
    ratio = (n - warm) / (decay - warm)
    coeff = 1.0 - ratio if opt["decay_style"] == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return low + coeff * (top - low)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama3_tokenizer_path, hf_tokenizer_json_path, llamafactory_data_dir):
    w = tmp_path_factory.mktemp("resume_rules")
    hf = make_tiny_hf(w / "hf")  # save_pretrained writes generation_config.json
    (hf / "original").mkdir()
    shutil.copyfile(llama3_tokenizer_path, hf / "original" / "tokenizer.model")
    shutil.copyfile(hf_tokenizer_json_path, hf / "tokenizer.json")
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        shutil.copyfile(TEMPLATES / name, hf / name)
    (hf / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>",
                                                            "eos_token": "<|eot_id|>"}))
    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "greedy", "greedy")
    jobs = []
    for name, changes in CASES.items():
        ck = {"dir": str(w / f"ck_{name}"), "save_interval": 100, "async_save": False}
        start = base_config(hf, shards, w / name, optimizer=START, checkpoint=ck,
                            training={"train_steps": 6, "global_batch_size": 2})
        resumed = json.loads(json.dumps(start))
        for section, values in changes.items():
            resumed[section].update(values)
        if name == "optimizer":
            resumed["checkpoint"]["export_hf"] = str(w / "export")
        jobs += [{"config": start, "signal_at_step": 3},
                 {"config": resumed, "optimizer_dump": str(w / f"{name}_optimizer.json")}]
    jobs.append({"config": base_config(hf, shards, w / "uninterrupted", optimizer=START,
                                       training={"train_steps": 6, "global_batch_size": 2})})
    launch(1, jobs, w, "resume")
    return {"dir": w, "hf": hf, "log": (w / "resume.log").read_text().splitlines()}


def _new_optimizer(name: str) -> dict:
    return START | CASES[name].get("optimizer", {})


def _total(name: str) -> int:
    return CASES[name].get("training", {}).get("train_steps", 6)


def _changes(name: str) -> dict:
    new = _new_optimizer(name)
    out = {f"optimizer.{k}": [START[k], new[k]] for k in START if new[k] != START[k]}
    if _total(name) != 6:
        out["training.train_steps"] = [6, _total(name)]
    return out


def _resume_line(runs, name: str) -> str | None:
    """The line after `resumed from ...` of the case's resumed job, when it is a `resume:` line."""
    log = runs["log"]
    at = next(i for i, line in enumerate(log) if line.startswith(f"resumed from {runs['dir']}/ck_{name}/iter_0000003"))
    return log[at + 1] if log[at + 1].startswith("resume:") else None


@pytest.mark.parametrize("name", list(CASES))
def test_resumed_steps_follow_the_schedule_of_the_new_config(runs, name):
    lrs = losses(runs["dir"] / name, key="lr")
    assert sorted(lrs) == list(range(1, _total(name) + 1))
    for step in (1, 2, 3):  # as started
        assert lrs[step] == pytest.approx(expected_lr(START, 6, step), rel=1e-9, abs=1e-15), (step, lrs)
    for step in range(4, _total(name) + 1):  # the config in force, from the resumed step on
        assert lrs[step] == pytest.approx(expected_lr(_new_optimizer(name), _total(name), step), rel=1e-9,
                                          abs=1e-15), (step, lrs)


def test_a_resume_without_changes_continues_the_uninterrupted_curve(runs):
    resumed, uninterrupted = losses(runs["dir"] / "same"), losses(runs["dir"] / "uninterrupted")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 7))
    assert resumed == uninterrupted  # bit for bit: the hyperparameters put back are the saved ones
    assert losses(runs["dir"] / "same", key="lr") == losses(runs["dir"] / "uninterrupted", key="lr")


@pytest.mark.parametrize("name", list(CASES))
def test_the_optimizer_holds_the_new_hyperparameters(runs, name):
    opt = _new_optimizer(name)
    dump = json.loads((runs["dir"] / f"{name}_optimizer.json").read_text())
    assert dump["clip_grad"] and all(c == opt["clip_grad"] for c in dump["clip_grad"])
    groups = dump["param_groups"]
    assert any(g["wd_mult"] == 1.0 for g in groups)
    for g in groups:
        assert g["weight_decay"] == pytest.approx(opt["weight_decay"] * g["wd_mult"])
        assert (g["max_lr"], g["min_lr"]) == (opt["lr"], opt["min_lr"])
        assert tuple(g["betas"]) == (opt["beta1"], opt["beta2"]) and g["eps"] == opt["eps"]
        assert g["lr"] == pytest.approx(expected_lr(opt, _total(name), 4))  # the rate step 4 uses


@pytest.mark.parametrize("name", list(CASES))
def test_one_line_says_what_changed_and_what_it_does_to_the_lr(runs, name):
    line = _resume_line(runs, name)
    changes = _changes(name)
    if not changes:
        assert line is None
        return
    said = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
    verb = "applies" if len(changes) == 1 else "apply"
    assert line.startswith(f"resume: {said} {verb} from step 4"), line
    before, after = expected_lr(START, 6, 4), expected_lr(_new_optimizer(name), _total(name), 4)
    assert f"lr at step 4 {before:.3g} -> {after:.3g}" in line and "not continued" in line, line
    if name == "steps":
        assert "re-planned over 10 steps" in line, line


@pytest.mark.parametrize("name", list(CASES))
def test_the_saved_config_and_checkpoint_say_what_ran(runs, name):
    ck = runs["dir"] / f"ck_{name}"
    saved = yaml.safe_load((ck / "config.yaml").read_text())
    opt = _new_optimizer(name)
    assert {k: saved["optimizer"][k] for k in opt} == opt
    assert saved["training"]["train_steps"] == _total(name)
    assert saved["derived"]["resume_step"] == 3 and saved["derived"]["resume_changes"] == _changes(name)
    meta = json.loads((ck / f"iter_{_total(name):07d}" / "megapack.json").read_text())
    assert {k: meta["optimizer"][k] for k in opt} == opt
    assert meta["plan"]["resume_changes"] == _changes(name) and meta["plan"]["total_steps"] == _total(name)


def _complete_tokenizer(out: Path, hf: Path) -> None:
    """The model's tokenizer files carried, its special tokens kept, the trained llama3 template written as jinja
    (in chat_template.jinja too, replacing the model folder's own llama3.1 one), end-of-turn among the eos ids."""
    from megapack.data.render.template_jinja import builtin_chat_template

    for name in ("tokenizer.json", "original/tokenizer.model"):
        assert (out / name).read_bytes() == (hf / name).read_bytes(), name
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == builtin_chat_template("llama3")
    assert (out / "chat_template.jinja").read_text() == builtin_chat_template("llama3")  # what transformers 5 reads
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|eot_id|>"
    assert 128009 in json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def test_the_trainer_export_carries_the_tokenizer_files(runs):
    _complete_tokenizer(runs["dir"] / "export", runs["hf"])


def test_convert_of_a_training_checkpoint_carries_its_model_tokenizer_files(runs):
    out = runs["dir"] / "converted"
    done = subprocess.run([sys.executable, "-m", "megapack", "convert", "megatron-to-hf", "--checkpoint-dir",
                           str(runs["dir"] / "ck_same" / "iter_0000006"), "--output-dir", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    _complete_tokenizer(out, runs["hf"])
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    said = done.stdout.strip().splitlines()[-1]
    assert said.startswith(f"wrote Hugging Face checkpoint {out} with the tokenizer of {runs['hf'].resolve()}")


def test_convert_refuses_in_one_line_when_the_tokenizer_source_is_not_there(runs, tmp_path, capsys):
    """Refused before any weight is read: the recorded model directory is gone, not recorded, or holds another
    vocabulary than the checkpoint was trained with (megapack.json alone is enough to decide)."""
    from megapack.cli import main

    meta = json.loads((runs["dir"] / "ck_same" / "iter_0000006" / "megapack.json").read_text())
    other_vocab = "vocab:" + "0" * 64
    cases = {
        "gone": (dict(meta, hf_dir=str(tmp_path / "moved")),
                 "{ckpt}: the run's model directory " + str(tmp_path / "moved") + " (model.hf_dir) is not there"),
        "unknown": ({k: v for k, v in meta.items() if k != "hf_dir"},
                    "{ckpt}: megapack.json does not say which model directory the run trained (model.hf_dir)"),
        "other": (dict(meta, tokenizer_identity=other_vocab),
                  f"{meta['hf_dir']}: its tokenizer ({meta['tokenizer_identity']}) is not the one {{ckpt}} was trained "
                  f"with ({other_vocab})"),
    }
    hint = "give --tokenizer-dir DIR (the tokenizer files to carry) or --no-tokenizer (weights and config.json only)"
    for name, (info, why) in cases.items():
        ckpt, out = tmp_path / name / "iter_0000006", tmp_path / f"out_{name}"
        ckpt.mkdir(parents=True)
        (ckpt / "megapack.json").write_text(json.dumps(info))
        assert main(["convert", "megatron-to-hf", "--checkpoint-dir", str(ckpt), "--output-dir", str(out)]) == 1
        err = capsys.readouterr().err.strip()
        assert err == f"error: {why.format(ckpt=ckpt)}; {hint}", err
        assert not out.exists()
