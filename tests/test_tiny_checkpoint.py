import json

import pytest
import torch

from megapack.model.tiny_checkpoint import tiny_llama_config, write_tiny_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tie", [False, True])
def test_transformers_loads_the_tiny_checkpoint_with_our_weights(tmp_path, tie):
    config = tiny_llama_config(vocab_size=512, tie_word_embeddings=tie)
    out = write_tiny_checkpoint(tmp_path / "tiny", config, seed=3)
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 500000.0
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    rope = getattr(model.config, "rope_parameters", None) or {"rope_theta": model.config.rope_theta}
    assert rope["rope_theta"] == 500000.0
    assert model.config.num_key_value_heads == 2
    emb = model.get_input_embeddings().weight
    assert emb.shape == (512, 64)
    assert 0.015 < float(emb.std()) < 0.025
    assert (model.lm_head.weight.data_ptr() == emb.data_ptr()) == tie
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 512) and torch.isfinite(logits).all()
