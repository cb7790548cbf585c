"""The real pretrained model asset: SmolLM2-135M-Instruct converted from its GGUF by megapack equals what
transformers' own GGUF loader reads (every tensor, the tokenizer's ids, the chat template), and the cached folder
is checked against its manifest."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from megapack.assets import MANIFEST, cache_root
from megapack.model import gguf_import

CHATS = [
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "What is 12 + 345? Answer with the number."},
     {"role": "assistant", "content": "357"}],
    [{"role": "user", "content": "Translate «Grüße aus Köln» to English — and explain the ß.\n\n  Thanks!"},
     {"role": "assistant", "content": "Greetings from Cologne. ß is a sharp s; <|im_end|> is a special token."},
     {"role": "user", "content": "def f(x):\n\treturn x ** 2  # 日本語 <repo_name>"}],
]


@pytest.fixture(scope="module")
def gguf_path(smollm2_dir: Path) -> Path:
    return cache_root() / gguf_import.HF_MODELS["smollm2-135m-instruct"].gguf_asset / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
def test_weights_equal_transformers_gguf_loader(smollm2_dir: Path, gguf_path: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                            dtype=torch.float32)
    ours = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    expected, actual = ref.state_dict(), ours.state_dict()
    assert sorted(actual) == sorted(expected)
    unequal = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not unequal, f"{len(unequal)} tensors differ, first {unequal[:3]}"
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "tie_word_embeddings", "max_position_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id"):
        assert getattr(ours.config, key) == getattr(ref.config, key), key
    assert ours.config.rope_parameters["rope_theta"] == ref.config.rope_parameters["rope_theta"] == 100000.0
    assert ours.config.rms_norm_eps == pytest.approx(ref.config.rms_norm_eps, rel=1e-6)


def test_tokenizer_and_template_equal_transformers_gguf_tokenizer(smollm2_dir: Path, gguf_path: Path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    for chat in CHATS:
        text = ref.apply_chat_template(chat, tokenize=False)
        assert ours.apply_chat_template(chat, tokenize=False) == text
        ids = ref(text, add_special_tokens=False)["input_ids"]
        assert ours(text, add_special_tokens=False)["input_ids"] == ids
        assert ids.count(1) == len(chat) + (chat[0]["role"] != "system")  # <|im_start|> stays one token
        assert ours.decode(ids) == text
    assert ours.special_tokens_map == ref.special_tokens_map
    assert (smollm2_dir / "chat_template.jinja").read_text(encoding="utf-8") == ref.chat_template
    from megapack.data.render.tokenizers import load_tokenizer

    mine = load_tokenizer(smollm2_dir / "tokenizer.json")  # megapack's own loader: the same ids and special ids
    for text in (m["content"] for chat in CHATS for m in chat if "<" not in m["content"]):
        assert mine.encode(text) == ref(text, add_special_tokens=False)["input_ids"]
    assert (mine.bos_id, mine.eos_id, mine.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)
    assert mine.special_tokens["<|im_start|>"] == 1


def test_cached_folder_is_checked_against_its_manifest(smollm2_dir: Path, tmp_path: Path):
    copy = tmp_path / "smol"
    shutil.copytree(smollm2_dir, copy, ignore=shutil.ignore_patterns("model.safetensors"))
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"]["model.safetensors"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert gguf_import._verified(copy)
    (copy / "config.json").write_text("{}")
    assert not gguf_import._verified(copy)
    start = time.perf_counter()
    assert gguf_import.fetch_hf_model("smollm2-135m-instruct") == smollm2_dir  # the cached one, verified
    assert time.perf_counter() - start < 10
