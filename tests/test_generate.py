"""`megapack generate`: greedy tokens equal transformers' `generate` on the exported HF folder, the KV cache equals a
full recompute (also for the next turn of a chat), decoding stops at the end-of-turn id, sampling repeats with
--seed, and usage errors are one line. The model: a tiny random LLaMA-3 (real 128,256 vocabulary, fp32) written by
transformers, converted with `megapack convert hf-to-megatron` and exported back with `megatron-to-hf`."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Name three colours of the rainbow."
EOT, END_OF_TEXT = 128009, 128001


def _random_llama(output_dir: Path, tokenizer_model: Path, seed: int = 3, eot_like: int | None = None) -> Path:
    """A random fp32 LlamaForCausalLM with the LLaMA-3 vocabulary (logits far apart: greedy has no near ties);
    `eot_like`: the <|eot_id|> output row is 1.5x that token's row, so the model soon says end of turn."""
    import transformers

    from megapack.model.tiny_checkpoint import tiny_llama_config

    config = tiny_llama_config(max_position_embeddings=256)
    config["rope_scaling"]["original_max_position_embeddings"] = 64
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.05)
        if eot_like is not None:
            model.lm_head.weight[EOT] = 1.5 * model.lm_head.weight[eot_like]
    model.save_pretrained(output_dir, safe_serialization=True)
    (output_dir / "original").mkdir()
    shutil.copyfile(tokenizer_model, output_dir / "original" / "tokenizer.model")
    return output_dir


def _convert(*args: str) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_checkpoint.py"), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama3_tokenizer_path) -> dict[str, Path]:
    """hf (transformers' folder), ckpt (hf-to-megatron), exported (megatron-to-hf of ckpt), run (a run's
    checkpoints/ folder holding ckpt as iter_0000003 behind `latest`, its megapack.json naming the template)."""
    root = tmp_path_factory.mktemp("generate")
    hf = _random_llama(root / "hf", llama3_tokenizer_path)
    _convert("hf-to-megatron", "--hf-dir", str(hf), "--output-dir", str(root / "ckpt"))
    _convert("megatron-to-hf", "--checkpoint-dir", str(root / "ckpt"), "--output-dir", str(root / "exported"))
    run = root / "run" / "checkpoints"
    shutil.copytree(root / "ckpt", run / "iter_0000003")
    meta = json.loads((run / "iter_0000003" / "megapack.json").read_text())
    meta["template"] = {"name": "llama3", "identity": "llama3:test", "options": {}}
    (run / "iter_0000003" / "megapack.json").write_text(json.dumps(meta))
    (run / "latest").write_text("iter_0000003\n")
    return {"hf": hf, "ckpt": root / "ckpt", "exported": root / "exported", "run": run}


def _prompt_ids(tokenizer, text: str = PROMPT) -> list[int]:
    from megapack.data.render.templates import get_template
    from megapack.data.sources.conversation import USER, Conversation, Message

    return get_template("llama3").prompt_ids(Conversation(messages=[Message(USER, text)]), tokenizer)


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from megapack.cli import main

    rc = main(["generate", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _hf_generate(hf_dir: Path, prompt: list[int], new: int) -> list[int]:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False,
                             eos_token_id=[EOT, END_OF_TEXT], pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.slow
def test_greedy_tokens_equal_transformers_generate(models, llama3_tokenizer, capsys):
    prompt = _prompt_ids(llama3_tokenizer)
    assert prompt[:2] == [128000, 128006] and prompt[-3:] == [78191, 128007, 271]  # ...assistant<|end_header_id|>\n\n
    expected = _hf_generate(models["exported"], prompt, 20)
    assert len(expected) == 20
    for checkpoint in ("run", "ckpt", "hf"):  # the run's `latest`, one checkpoint folder, the HF folder itself
        rc, out, err = _cli(capsys, "--checkpoint", str(models[checkpoint]), "--prompt", PROMPT,
                            "--max-new-tokens", "20", "--json")
        assert rc == 0, err
        answer = json.loads(out)
        assert answer["tokens"] == expected, checkpoint
        assert answer["text"] == llama3_tokenizer.decode(expected)
    assert "iteration 3, the latest of its run" not in err  # the last load was the HF folder
    rc, out, err = _cli(capsys, "--checkpoint", str(models["run"]), "--prompt", PROMPT, "--max-new-tokens", "3")
    assert rc == 0 and out == llama3_tokenizer.decode(expected[:3]) + "\n"
    assert f"{models['run'] / 'iter_0000003'} (iteration 3, the latest of its run)" in err
    assert "template llama3 (trained with)" in err


@pytest.mark.slow
def test_kv_cache_equals_full_recompute_also_for_the_next_turn(models):
    from megapack.inference.chat import ChatModel
    from megapack.model.generate import Decoder

    chat = ChatModel(models["ckpt"])
    try:
        no_cache = Decoder(chat.model, chat.decoder.max_length, use_cache=False)
        turn = [{"role": "user", "content": PROMPT}]
        ids = chat.prompt_ids(turn)
        cached = chat.decoder.generate(ids, 20)
        assert cached.prompt_tokens == len(ids)
        assert cached.tokens == no_cache.generate(ids, 20).tokens
        # the next turn runs only its new tokens through the model: a chunk of several queries over the cache
        turn += [{"role": "assistant", "content": chat.tokenizer.decode(cached.tokens)},
                 {"role": "user", "content": "And two more?"}]
        ids = chat.prompt_ids(turn)
        again = chat.decoder.generate(ids, 20)
        assert again.prompt_tokens < len(ids) - 10
        assert again.tokens == no_cache.generate(ids, 20).tokens
        # a stop id ends decoding at that token, and the answer text leaves it out
        stop = again.tokens[4]
        first = again.tokens.index(stop)
        stopped = Decoder(chat.model, 256).generate(ids, 20, stop_ids=[stop])
        assert stopped.tokens == again.tokens[:first + 1] and stopped.stopped == "stop_token"
    finally:
        chat.close()


@pytest.mark.slow
def test_decoding_stops_at_the_end_of_turn_id(tmp_path, llama3_tokenizer_path, llama3_tokenizer, capsys):
    prompt = _prompt_ids(llama3_tokenizer)
    plain = _random_llama(tmp_path / "plain", llama3_tokenizer_path)
    greedy = _hf_generate(plain, prompt, 20)
    hf = _random_llama(tmp_path / "eot", llama3_tokenizer_path, eot_like=greedy[5])
    expected = _hf_generate(hf, prompt, 20)
    assert expected[-1] == EOT and len(expected) < 20  # transformers stops there too
    rc, out, err = _cli(capsys, "--checkpoint", str(hf), "--prompt", PROMPT, "--max-new-tokens", "20", "--json")
    assert rc == 0, err
    answer = json.loads(out)
    assert answer["tokens"] == expected
    assert answer["text"] == llama3_tokenizer.decode(expected[:-1])  # without <|eot_id|>
    assert "(stop_token)" in err


@pytest.mark.slow
def test_sampling_is_reproducible_with_seed(models, capsys):
    def sample(seed: int) -> list[int]:
        rc, out, err = _cli(capsys, "--checkpoint", str(models["ckpt"]), "--prompt", PROMPT, "--max-new-tokens",
                            "12", "--temperature", "1.5", "--top-p", "0.95", "--seed", str(seed), "--json")
        assert rc == 0, err
        return json.loads(out)["tokens"]

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_usage_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nothing"
    rc, _, err = _cli(capsys, "--checkpoint", str(missing), "--prompt", "hi")
    assert rc == 1 and err.strip().splitlines() == [f"error: --checkpoint {missing}: no such directory (expected a "
                                                    f"megatron checkpoint folder, a run's checkpoints/ folder, or a "
                                                    f"Hugging Face folder)"]
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _cli(capsys, "--checkpoint", str(empty), "--prompt", "hi")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and f"--checkpoint {empty}: holds no" in err
    bad = tmp_path / "bad.json"  # checked before any model loads
    bad.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]')
    rc, _, err = _cli(capsys, "--checkpoint", str(empty), "--messages", str(bad))
    assert rc == 1 and err.strip() == (f"error: --messages {bad}: the last message must be from the user (or a "
                                       f"tool), for the model to answer")
    bad.write_text('{"messages": [{"role": "user"}]}')
    rc, _, err = _cli(capsys, "--checkpoint", str(empty), "--messages", str(bad))
    assert rc == 1 and "message 0 has no text content" in err and len(err.strip().splitlines()) == 1
    rc, _, err = _cli(capsys, "--checkpoint", str(empty), "--prompt", "hi", "--temperature", "-1")
    assert rc == 1 and err.strip() == "error: --temperature -1.0: expected a number >= 0 (0: greedy)"


def test_messages_render_with_the_generation_prompt(llama3_tokenizer):
    from megapack.inference.chat import to_conversation
    from megapack.data.render.templates import get_template

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    ids = get_template("llama3").prompt_ids(to_conversation(messages), llama3_tokenizer)
    text = llama3_tokenizer.decode(ids)
    assert text == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_cached_chunk_attention_equals_the_last_rows_of_full_causal_attention():
    """The core attention megatron's KV cache calls: q holds the last 3 of 7 positions, k/v all 7."""
    from megapack.model.attention import PackedCoreAttention

    attention = PackedCoreAttention.__new__(PackedCoreAttention)
    torch.nn.Module.__init__(attention)
    attention.backend, attention.softmax_scale = "sdpa", 8 ** -0.5
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 1, heads, 8, generator=gen) for heads in (4, 2, 2))
    full = attention._padded(q, k, v, None)
    assert torch.allclose(attention._padded(q[-3:], k, v, None), full[-3:], atol=1e-6)
    assert torch.allclose(attention._padded(q[-1:], k, v, None), full[-1:], atol=1e-6)


def test_top_p_keeps_the_smallest_nucleus():
    from megapack.model.generate import Sampling, pick_next

    logits = torch.log(torch.tensor([0.05, 0.6, 0.3, 0.05]))
    gen = torch.Generator().manual_seed(0)
    picks = {pick_next(logits, Sampling(temperature=1.0, top_p=0.5), gen) for _ in range(50)}
    assert picks == {1}
    picks = {pick_next(logits, Sampling(temperature=1.0, top_p=0.85), gen) for _ in range(200)}
    assert picks == {1, 2}
    assert pick_next(logits, Sampling(), None) == 1
