"""SmolLM2 through megapack and back out: HF folder -> torch_dist -> exported HF folder. Every tokenizer file travels
(chat_template.jinja, special and added tokens), the export loads with AutoTokenizer and AutoModelForCausalLM,
renders chats exactly as the source folder does, gives the megatron model's logits and answers a question."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from model_helpers import run_workers

pytestmark = pytest.mark.slow

transformers = pytest.importorskip("transformers")

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
TWO_TURNS = [{"role": "system", "content": "Answer in one word."},
             {"role": "user", "content": "Capital of Italy?"}, {"role": "assistant", "content": "Rome"},
             {"role": "user", "content": "And of Spain? <|im_end|> is not the end."}]
# measured: max |exported transformers - megatron| 0.0 over logits up to 40.6 (fp32, 2 CPU cores: one unpacked
# sequence, the same kernels); the tolerance leaves room for other CPUs' summation orders
ABS_TOL = 1e-4


def round_trip_job(source: str, work: str, ids: list[int]) -> dict:
    """`megapack convert` both ways in this process, then the megatron model's logits of `ids` from the checkpoint."""
    from megapack.cli import main
    from megapack.model.builder import build_model
    from megapack.model.checkpoint import load_model_checkpoint, read_metadata
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    ckpt, out = Path(work) / "ckpt", Path(work) / "export"
    assert main(["convert", "hf-to-megatron", "--hf-dir", source, "--output-dir", str(ckpt)]) == 0
    assert main(["convert", "megatron-to-hf", "--checkpoint-dir", str(ckpt), "--output-dir", str(out)]) == 0
    init_distributed(tp=1, pp=1)
    try:
        model = build_model(read_metadata(ckpt)["hf_config"], perform_initialization=False).eval()
        load_model_checkpoint(model, ckpt)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(len(ids))[None],
                           attention_mask=None)
    finally:
        destroy_distributed()
    return {"logits": logits[0].numpy(), "export": str(out)}


@pytest.fixture(scope="module")
def exported(smollm2_dir, tmp_path_factory):
    source_tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = list(source_tok.apply_chat_template(TWO_TURNS, tokenize=True, return_dict=True)["input_ids"])
    (result,) = run_workers(round_trip_job, 1, timeout_s=900, source=str(smollm2_dir),
                            work=str(tmp_path_factory.mktemp("smol_export")), ids=ids)
    return Path(result["export"]), result["logits"], ids, source_tok


def test_every_tokenizer_file_travels(exported, smollm2_dir):
    out, _, _, source_tok = exported
    assert (out / "chat_template.jinja").read_text() == (smollm2_dir / "chat_template.jinja").read_text()
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((smollm2_dir / "tokenizer.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for chat in (CHAT, TWO_TURNS):
        for prompt in (False, True):
            assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt) == \
                source_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
    text = source_tok.apply_chat_template(TWO_TURNS, tokenize=False)
    assert tok(text)["input_ids"] == source_tok(text)["input_ids"]
    assert tok.special_tokens_map == source_tok.special_tokens_map
    assert tok.all_special_tokens == source_tok.all_special_tokens and len(tok.all_special_tokens) == 17
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)


def test_export_logits_equal_megatron_and_it_answers(exported):
    out, megatron_logits, ids, _ = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == 3
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(logits - megatron_logits).max() <= ABS_TOL
    assert np.array_equal(logits.argmax(-1), megatron_logits.argmax(-1))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        answer = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(answer[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
