"""The real pretrained model (SmolLM2-135M-Instruct, fp32) in megatron at TP1, TP3, PP2 and TP3xPP2 gives the logits
of transformers' LlamaForCausalLM on real chat text: a packed row of several conversations (cu_seqlens), each
segment compared with transformers run on that conversation alone.

SmolLM2 is what the tiny random models cannot be: 9 query and 3 KV heads (TP3 leaves one KV head per rank), head_dim
64, tied embeddings across pipeline stages, RoPE theta 100,000, a 49,152 vocabulary. One spawned 6-process gloo job
runs the four layouts one after another (only the data-parallel replica 0 computes); the parent compares.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model_helpers import run_workers

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

transformers = pytest.importorskip("transformers")

LAYOUTS = [(1, 1), (3, 1), (1, 2), (3, 2)]
# measured (2 CPU cores, fp32, sdpa, 4 conversations / 299 tokens): max |megatron - transformers| 6.5e-5 at TP1 and
# PP2, 7.6e-5 at TP3 and TP3xPP2, over logits up to 37.6 in magnitude (relative 1.9e-6); argmax identical
ABS_TOL, REL_TOL = 2e-4, 1e-5


def smollm2_chats(data_dir) -> list[list[dict]]:
    """Real chat text: three short alpaca conversations and a two-turn identity chat (LLaMA-Factory's demo data)."""
    alpaca = json.loads((data_dir / "alpaca_en_demo.json").read_text())
    short = [r for r in alpaca if len(r["instruction"]) + len(r["input"]) + len(r["output"]) < 260][:3]
    chats = [[{"role": "user", "content": (r["instruction"] + "\n\n" + r["input"]).strip()},
              {"role": "assistant", "content": r["output"]}] for r in short]
    identity = json.loads((data_dir / "identity.json").read_text())[:2]
    chats.append([m for r in identity for m in (
        {"role": "user", "content": r["instruction"]},
        {"role": "assistant", "content": r["output"].replace("{{name}}", "SmolLM").replace("{{author}}", "Hugging Face")})])
    return chats


def smollm2_layouts_job(hf_dir: str, convs: list[list[int]]) -> dict:
    """Runs in each of 6 ranks: the packed row's logits at every layout, from the rank that holds them."""
    import gc

    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams

    from megapack.model.builder import build_model
    from megapack.model.config import load_hf_config
    from megapack.model.hf_import import load_hf_weights
    from megapack.training.run.distributed import destroy_distributed, init_distributed
    from test_model_parallel import _pipeline_forward

    cfg = load_hf_config(hf_dir)
    lengths = [len(c) for c in convs]
    tokens = torch.tensor([t for c in convs for t in c])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int32)
    packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lengths),
                             max_seqlen_kv=max(lengths))
    res: dict = {}
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        if ps.get_data_parallel_rank() == 0:  # the other replicas would compute the same numbers
            model = build_model(cfg, seq_length=1024).eval()
            load_hf_weights(model, hf_dir)
            out = _pipeline_forward(model, tokens, positions, packed)
            if out is not None and ps.get_tensor_model_parallel_rank() == 0:
                res[f"tp{tp}pp{pp}"] = out[0].numpy()
            del model, out
            gc.collect()
        ps.destroy_model_parallel()
    destroy_distributed()
    return res


@pytest.fixture(scope="module")
def layouts(smollm2_dir, llamafactory_data_dir):
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    convs = [tok.apply_chat_template(chat, tokenize=True, return_dict=False) for chat in smollm2_chats(llamafactory_data_dir)]
    convs = [list(c["input_ids"]) if isinstance(c, dict) else list(c) for c in convs]
    results = run_workers(smollm2_layouts_job, 6, timeout_s=900, hf_dir=str(smollm2_dir), convs=convs)
    merged = {k: v for r in results for k, v in r.items()}
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        refs = [model(input_ids=torch.tensor([c])).logits[0].numpy() for c in convs]
    return convs, merged, refs


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_smollm2_packed_logits_equal_transformers_per_conversation(layouts, tp, pp):
    convs, merged, refs = layouts
    assert len(convs) == 4 and sum(map(len, convs)) > 250 and all(c.count(1) >= 3 for c in convs)  # <|im_start|>
    logits = merged[f"tp{tp}pp{pp}"]
    assert logits.shape == (sum(map(len, convs)), 49152)  # 49,152 = 128 x 384: no padding at TP1 or TP3
    start = 0
    for conv, ref in zip(convs, refs):
        seg = logits[start:start + len(conv)]
        diff = np.abs(seg - ref).max()
        assert diff <= ABS_TOL and diff / np.abs(ref).max() <= REL_TOL, (tp, pp, float(diff))
        assert np.array_equal(seg.argmax(-1), ref.argmax(-1))
        start += len(conv)
