"""tools/convert_checkpoint.py: HF -> torch_dist -> HF as separate single-process CPU runs, bit for bit."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model_helpers import hf_logits, make_hf_checkpoint, packed_example

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_VOCAB = "vocab:2b6dff733d9c48f89f6efd2e9c62e69238bb03ca9c50345b0c7a00a48b35196b"  # as in test_tokenizers.py


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_hf_to_megatron_to_hf_round_trip(tmp_path, llama3_tokenizer_path):
    from safetensors.torch import load_file

    hf = make_hf_checkpoint(tmp_path / "hf", tied=False, seed=4, num_layers=2)
    (hf / "original").mkdir()
    shutil.copyfile(llama3_tokenizer_path, hf / "original" / "tokenizer.model")

    out = _convert("hf-to-megatron", "--hf-dir", str(hf), "--output-dir", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((tmp_path / "ckpt" / "megapack.json").read_text())
    assert meta["format"] == "megapack-torch-dist-v1"
    assert meta["tokenizer_identity"] == LLAMA3_VOCAB
    assert meta["hf_config"]["num_hidden_layers"] == 2 and meta["hf_config"]["vocab_size"] == 300
    assert (tmp_path / "ckpt" / "metadata.json").is_file()  # megatron's torch_dist marker

    out = _convert("megatron-to-hf", "--checkpoint-dir", str(tmp_path / "ckpt"), "--output-dir",
                   str(tmp_path / "back"), "--max-shard-size", "60KB")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Warning" not in out.stderr, out.stderr  # megatron/torch deprecation noise is silenced in one place
    back = tmp_path / "back"
    shards = sorted(back.glob("model-*.safetensors"))
    assert len(shards) > 1 and (back / "model.safetensors.index.json").is_file()
    original = load_file(str(hf / "model.safetensors"))
    exported = {}
    for shard in shards:
        exported.update(load_file(str(shard)))
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name
    assert (back / "original" / "tokenizer.model").read_bytes() == Path(llama3_tokenizer_path).read_bytes()
    config = json.loads((back / "config.json").read_text())
    assert config.get("rope_theta", config.get("rope_parameters", {}).get("rope_theta")) == 500000.0

    _, tokens, _, _ = packed_example(lengths=(20,))
    assert torch.equal(hf_logits(back, tokens), hf_logits(hf, tokens))

    again = _convert("megatron-to-hf", "--checkpoint-dir", str(tmp_path / "ckpt"), "--output-dir", str(back))
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1].startswith("error: ") and "not empty" in again.stderr


def test_convert_usage_errors_are_one_line(tmp_path):
    out = _convert("hf-to-megatron", "--hf-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path / "c"))
    assert out.returncode == 1
    missing = tmp_path / "missing" / "config.json"
    expected = f"error: {missing}: no such file (expected a Hugging Face config.json)"
    assert out.stderr.strip().splitlines()[-1] == expected


@pytest.mark.slow
def test_tokenizer_json_checkpoint_matches_tiktoken_shards(tmp_path, llama3_tokenizer_path, hf_tokenizer_json_path,
                                                           mistral_sp_model_path, llamafactory_data_dir):
    """An HF checkpoint with only tokenizer.json records the identity that shards made with the ranks file carry."""
    from megapack.data.pipeline.preprocess import PreprocessConfig, run_preprocess
    from megapack.data.render.vocab import vocab_identity
    from megapack.errors import MegapackError
    from megapack.training.preflight.config import load_config
    from megapack.training.preflight.plan import preflight

    hf = make_hf_checkpoint(tmp_path / "hf", seed=1, num_layers=1)
    shutil.copyfile(hf_tokenizer_json_path, hf / "tokenizer.json")
    out = _convert("hf-to-megatron", "--hf-dir", str(hf), "--output-dir", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt_meta = json.loads((tmp_path / "ckpt" / "megapack.json").read_text())
    assert ckpt_meta["tokenizer_identity"] == LLAMA3_VOCAB

    shards = tmp_path / "shards"
    meta = run_preprocess(PreprocessConfig(output_dir=str(shards), tokenizer_model=str(llama3_tokenizer_path),
                                           datasets=["identity"], dataset_dir=str(llamafactory_data_dir),
                                           seq_length=256, progress=False))
    assert meta["tokenizer_identity"] == ckpt_meta["tokenizer_identity"] == LLAMA3_VOCAB

    from megapack.model.tiny_checkpoint import tiny_llama_config

    full_vocab = tmp_path / "hf_llama3_vocab"  # preflight compares the shards' token ids with config.json's vocabulary
    full_vocab.mkdir()
    (full_vocab / "config.json").write_text(json.dumps(tiny_llama_config()))
    raw = {"model": {"hf_dir": str(full_vocab), "init": "megatron", "megatron_checkpoint": str(tmp_path / "ckpt")},
           "data": {"path": str(shards), "seq_length": 256}, "training": {"global_batch_size": 2, "train_steps": 1}}
    assert preflight(load_config(None, raw=raw), world_size=1).dp == 1

    other = tmp_path / "ckpt_mistral"  # the same checkpoint claiming Mistral's vocabulary
    shutil.copytree(tmp_path / "ckpt", other)
    mistral = vocab_identity(mistral_sp_model_path)
    (other / "megapack.json").write_text(json.dumps(dict(ckpt_meta, tokenizer_identity=mistral)))
    raw["model"]["megatron_checkpoint"] = str(other)
    with pytest.raises(MegapackError) as err:
        preflight(load_config(None, raw=raw), world_size=1)
    assert str(err.value) == (f"data.path: tokenizer identity {LLAMA3_VOCAB} of the shards in {shards} differs from "
                              f"the checkpoint's {mistral}")


@pytest.mark.slow
def test_megatron_to_hf_takes_a_runs_checkpoint_folder_and_overwrite(tmp_path):
    """`--checkpoint-dir RUN/checkpoints` exports the iteration `latest` names and says which; a non-empty
    --output-dir is refused in one line without --overwrite, replaced with it (an HF folder only)."""
    hf = make_hf_checkpoint(tmp_path / "hf", tied=False, seed=4, num_layers=2)
    checkpoints = tmp_path / "run" / "checkpoints"
    out = _convert("hf-to-megatron", "--hf-dir", str(hf), "--output-dir", str(checkpoints / "iter_0000003"))
    assert out.returncode == 0, out.stderr[-3000:]
    (checkpoints / "latest").write_text("iter_0000003\n")
    back = tmp_path / "back"
    args = ("megatron-to-hf", "--checkpoint-dir", str(checkpoints), "--output-dir", str(back), "--no-tokenizer")
    out = _convert(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{checkpoints / 'iter_0000003'} (iteration 3, the latest of its run)" in out.stdout + out.stderr
    assert (back / "config.json").is_file() and (back / "model.safetensors").is_file()
    again = _convert(*args)
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == (f"error: --output-dir {back}: exists and is not empty; pass "
                                                     f"--overwrite to replace it")
    (back / "config.json").write_text("{}")  # replaced below, not kept
    out = _convert(*args, "--overwrite")
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((back / "config.json").read_text())["num_hidden_layers"] == 2
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("mine")
    refused = _convert("megatron-to-hf", "--checkpoint-dir", str(checkpoints), "--output-dir", str(other),
                       "--no-tokenizer", "--overwrite")
    assert refused.returncode == 1 and (other / "todo.txt").read_text() == "mine"
    assert refused.stderr.strip().splitlines()[-1] == (f"error: --output-dir {other}: holds no config.json, so it is "
                                                       f"not a Hugging Face folder; --overwrite replaces only those")


def _trained_checkpoint(tmp_path, tokenizer_model, system=None) -> Path:
    """A megatron checkpoint as training writes it from a model folder without tokenizer files (the launcher's tiny
    model): megapack.json records that folder, the shards' tokenizer file and their llama3 template."""
    from megapack.data.render.templates import TemplateOptions, get_template

    hf = make_hf_checkpoint(tmp_path / "hf", tied=False, seed=5, num_layers=2)
    out = _convert("hf-to-megatron", "--hf-dir", str(hf), "--output-dir", str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr[-3000:]
    meta_path = tmp_path / "ckpt" / "megapack.json"
    options = {"train_on_prompt": False, "mask_history": False, "default_system": system}
    template = {"name": "llama3", "identity": get_template("llama3").identity(TemplateOptions(**options)),
                "options": options}
    meta = json.loads(meta_path.read_text())
    meta.update(hf_dir=str(hf), tokenizer_model=str(tokenizer_model), template=template, tokenizer_identity=LLAMA3_VOCAB)
    meta_path.write_text(json.dumps(meta))
    return tmp_path / "ckpt"


@pytest.mark.slow
def test_export_of_a_run_without_tokenizer_files_loads_in_transformers(tmp_path, llama3_tokenizer, llama3_tokenizer_path):
    """The export writes a complete tokenizer (tokenizer.json built from the ranks file, the special tokens, the
    trained template as jinja, generation eos ids); transformers loads it and renders the ids megapack trained on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from megapack.data.render.templates import TemplateOptions, get_template
    from megapack.data.sources.conversation import Conversation, Message

    ckpt = _trained_checkpoint(tmp_path, llama3_tokenizer_path, system="Be brief.")
    out = _convert("megatron-to-hf", "--checkpoint-dir", str(ckpt), "--output-dir", str(tmp_path / "back"))
    assert out.returncode == 0, out.stderr[-3000:]
    back = tmp_path / "back"
    assert out.stdout.strip().splitlines()[-1].startswith(f"wrote Hugging Face checkpoint {back} with the tokenizer")
    tok = AutoTokenizer.from_pretrained(back)
    AutoModelForCausalLM.from_pretrained(back)
    eot = llama3_tokenizer.token_id("<|eot_id|>")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|begin_of_text|>", "<|end_of_text|>",
                                                            "<|finetune_right_pad_id|>")
    assert GenerationConfig.from_pretrained(back).eos_token_id == [llama3_tokenizer.eos_id, eot]
    template, options = get_template("llama3"), TemplateOptions(default_system="Be brief.")
    chats = [[Message("user", "Hi there!")],
             [Message("user", "Hi. 12345 ünï 😀"), Message("assistant", "Hello.\nHow can I help?"),
              Message("user", "A joke, please.\n\n")]]
    for messages in chats:
        hf_messages = [{"role": m.role, "content": m.content} for m in messages]
        ids = tok.apply_chat_template(hf_messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        assert ids["input_ids"] == template.prompt_ids(Conversation(messages=messages), llama3_tokenizer, options)
    assert tok("Hello world").input_ids == [llama3_tokenizer.bos_id] + llama3_tokenizer.encode("Hello world")


def test_export_refuses_in_one_line_without_a_tokenizer(tmp_path, llama3_tokenizer_path, capsys):
    """A model folder without tokenizer files and a shards' tokenizer file gone: refused before any weight is read."""
    from megapack.cli import main

    ckpt = _trained_checkpoint(tmp_path, tmp_path / "gone" / "tokenizer.model")
    out = tmp_path / "back"
    capsys.readouterr()  # the model writer's progress bar
    assert main(["convert", "megatron-to-hf", "--checkpoint-dir", str(ckpt), "--output-dir", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {ckpt}: {tmp_path / 'hf'} holds no tokenizer file (tokenizer.json, tokenizer.model or "
                   f"original/tokenizer.model); give --tokenizer-dir DIR (the tokenizer files to carry) or "
                   f"--no-tokenizer (weights and config.json only)"), err
    assert not out.exists()
