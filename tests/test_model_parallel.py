"""megatron-core LLaMA at TP1/TP2/PP2/TP2xPP2 against transformers, packed attention, checkpoints, export.

One spawned 4-process gloo job runs every multi-process check (process start and megatron import cost seconds)
and returns numbers; the tests below assert on them against transformers' LlamaForCausalLM in this process.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from model_helpers import hf_logits, make_hf_checkpoint, packed_example, run_workers

pytestmark = pytest.mark.multiprocess  # one 4-process spawned gloo job

transformers = pytest.importorskip("transformers")

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
BATCH_SHAPE = (2, 16)


def _pipeline_forward(model, tokens, positions, packed=None):
    """Forward through all pipeline stages with explicit p2p; returns logits on the last stage, else None."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    b, t = tokens.shape
    if not ps.is_pipeline_first_stage():
        # THD hidden states are [t, 1, h]; padded batches are [s, b, h]
        hidden = torch.empty(t, b, model.config.hidden_size)
        dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
        model.set_input_tensor(hidden)
    with torch.no_grad():
        out = model(input_ids=tokens, position_ids=positions, attention_mask=None, packed_seq_params=packed)
    if not ps.is_pipeline_last_stage():
        dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
        return None
    return out


def _packed_params(cu):
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def _logits_of(model, tokens, positions, packed=None):
    out = _pipeline_forward(model, tokens, positions, packed)
    return None if out is None else out.numpy()


def parallel_job(untied: str, tied: str, work: str, bad_shape: str, bad_shard: str) -> dict:
    """Runs in each of 4 ranks; returns {check: value} (logits only from the rank holding them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megapack.errors import MegapackError
    from megapack.model.builder import build_model
    from megapack.model.checkpoint import load_model_checkpoint, save_model_checkpoint
    from megapack.model.config import load_hf_config
    from megapack.model.hf_export import export_hf
    from megapack.model.hf_import import load_hf_weights
    from megapack.training.run.distributed import destroy_distributed, init_distributed

    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(3, 300, BATCH_SHAPE, generator=gen)
    batch_pos = torch.arange(BATCH_SHAPE[1]).expand(BATCH_SHAPE).contiguous()
    convs, pack, pack_pos, cu = packed_example()
    res: dict = {"rank": dist.get_rank() if dist.is_initialized() else None}

    def build(cfg, hf_dir, **kw):
        model = build_model(cfg, seq_length=64, **kw).eval()
        return model, load_hf_weights(model, hf_dir)

    def keep(name, value):
        if value is not None:
            res[name] = value

    cfg_u, cfg_t = load_hf_config(untied), load_hf_config(tied)
    for tp, pp in LAYOUTS:
        init_distributed(tp=tp, pp=pp)
        tag = f"tp{tp}pp{pp}"
        model, stats = build(cfg_u, untied)
        res[f"{tag}/bytes"] = stats["bytes_read"]
        res[f"{tag}/pos"] = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        keep(f"{tag}/batch", _logits_of(model, batch, batch_pos))
        keep(f"{tag}/pack", _logits_of(model, pack, pack_pos, _packed_params(cu)))
        alone = [_logits_of(model, c[None], torch.arange(len(c))[None]) for c in convs]
        keep(f"{tag}/alone", alone if alone[0] is not None else None)
        model_t, _ = build(cfg_t, tied)
        keep(f"{tag}/tied", _logits_of(model_t, batch, batch_pos))
        if (tp, pp) == (2, 2):
            cross, _ = build(cfg_u, untied, cross_sample_attention=True)
            keep(f"{tag}/cross", _logits_of(cross, pack, pack_pos, _packed_params(cu)))
            export_hf(model, cfg_u, Path(work) / "export_untied")
            export_hf(model_t, cfg_t, Path(work) / "export_tied", max_shard_bytes=20_000)
            resharded, _ = build(cfg_t, str(Path(work) / "export_tied"))  # import from a sharded index
            keep(f"{tag}/tied_from_shards", _logits_of(resharded, batch, batch_pos))
            for name, path in (("bad_shape", bad_shape), ("bad_shard", bad_shard)):
                try:
                    build(load_hf_config(path), path)
                    res[name] = "no error"
                except MegapackError as exc:
                    res[name] = str(exc)
        if (tp, pp) == (2, 1):
            with torch.no_grad():
                res["tp2pp1/loss"] = model(input_ids=batch, position_ids=batch_pos, attention_mask=None,
                                           labels=batch.roll(-1, dims=1)).numpy()
            sp_model, _ = build(cfg_u, untied, sequence_parallel=True)
            keep("tp2pp1/pack_sp", _logits_of(sp_model, pack, pack_pos, _packed_params(cu)))
            save_model_checkpoint(model, Path(work) / "ckpt_tp2", cfg_u, "tok:sha256:abc", extra={"iteration": 7})
        if (tp, pp) == (1, 2):
            fresh = build_model(cfg_u, seq_length=64).eval()
            res["ckpt_meta"] = load_model_checkpoint(fresh, Path(work) / "ckpt_tp2")
            keep("ckpt_pp2/batch", _logits_of(fresh, batch, batch_pos))
        ps.destroy_model_parallel()
    destroy_distributed()
    return res


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    untied = make_hf_checkpoint(root / "untied", tied=False, seed=0)
    tied = make_hf_checkpoint(root / "tied", tied=True, seed=1)
    bad_shape = root / "bad_shape"
    shutil.copytree(untied, bad_shape)
    cfg = json.loads((bad_shape / "config.json").read_text())
    cfg["intermediate_size"] = 96  # weights keep 128: gate/up/down no longer match config.json
    (bad_shape / "config.json").write_text(json.dumps(cfg))
    bad_shard = root / "bad_shard"
    shutil.copytree(untied, bad_shard)
    names = _safetensor_keys(untied / "model.safetensors")
    index = {"metadata": {}, "weight_map": {n: ("model-00002-of-00002.safetensors" if "layers.3." in n else
                                                "model.safetensors") for n in names}}
    (bad_shard / "model.safetensors.index.json").write_text(json.dumps(index))
    results = run_workers(parallel_job, 4, timeout_s=600, untied=str(untied), tied=str(tied), work=str(root),
                          bad_shape=str(bad_shape), bad_shard=str(bad_shard))
    merged: dict = {}
    for r in results:
        merged.update({k: v for k, v in r.items() if not k.endswith("/bytes") and not k.endswith("/pos")})
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(3, 300, BATCH_SHAPE, generator=gen)
    convs, pack, _, _ = packed_example()
    return {
        "res": merged, "per_rank": results, "root": root, "untied": untied, "tied": tied, "convs": convs,
        "ref_batch": hf_logits(untied, batch).numpy(), "ref_tied": hf_logits(tied, batch).numpy(),
        "ref_alone": [hf_logits(untied, c[None]).numpy() for c in convs],
    }


def _safetensor_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_logits_match_transformers_at_every_layout(job, tp, pp):
    res = job["res"]
    for key, ref in ((f"tp{tp}pp{pp}/batch", job["ref_batch"]), (f"tp{tp}pp{pp}/tied", job["ref_tied"])):
        logits = res[key]
        assert logits.shape == (*BATCH_SHAPE, 384 if tp == 1 else 512)  # vocab 300 padded to 128 x TP
        assert _rel(logits[..., :300], ref) <= 1e-4, key
        assert np.all(logits[..., 300:] <= -1e30)  # padding can never win a softmax or an argmax


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_packed_forward_equals_each_conversation_alone(job, tp, pp):
    res, convs = job["res"], job["convs"]
    pack, alone = res[f"tp{tp}pp{pp}/pack"], res[f"tp{tp}pp{pp}/alone"]
    start = 0
    for conv, single, ref in zip(convs, alone, job["ref_alone"]):
        n = len(conv)
        assert np.abs(pack[0, start : start + n] - single[0]).max() <= 1e-5
        assert _rel(single[0, :, :300], ref[0]) <= 1e-4
        start += n


def test_cross_sample_attention_visibly_differs(job):
    res, convs = job["res"], job["convs"]
    cross, alone = res["tp2pp2/cross"], res["tp2pp2/alone"]
    n0 = len(convs[0])
    # the first conversation sees nothing before it either way; the later ones attend across the boundary
    assert np.abs(cross[0, :n0] - alone[0][0]).max() <= 1e-5
    assert np.abs(cross[0, n0 : n0 + len(convs[1])] - alone[1][0]).max() > 1e-2


def test_vocab_parallel_loss_equals_cross_entropy_on_transformers_logits(job):
    """The padded vocabulary columns stay out of the softmax: per-token loss == CE over the real 300 logits."""
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(3, 300, BATCH_SHAPE, generator=gen).roll(-1, dims=1)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(job["ref_batch"]).flatten(0, 1), labels.flatten(),
                                            reduction="none").view(BATCH_SHAPE).numpy()
    assert _rel(job["res"]["tp2pp1/loss"], ref) <= 1e-5


def test_tied_model_loads_from_its_sharded_export(job):
    res = job["res"]
    assert np.array_equal(res["tp2pp2/tied_from_shards"], res["tp2pp2/tied"])


def test_sequence_parallel_packed_forward_is_identical(job):
    res = job["res"]
    assert np.array_equal(res["tp2pp1/pack_sp"], res["tp2pp1/pack"])


def test_each_rank_reads_only_its_slices(job):
    """Bytes read per rank equal exactly its TP/PP share of the fp32 checkpoint (replicated norms in full)."""
    h, ffn, q, kv, vocab, layers = 64, 128, 64, 32, 300, 4
    per_layer_split = (q * h + 2 * kv * h + h * q + 3 * ffn * h) * 4
    norms = 2 * h * 4
    for result in job["per_rank"]:
        for tp, pp in LAYOUTS:
            tp_rank, pp_rank = result[f"tp{tp}pp{pp}/pos"]
            rows_per_rank = 384 // tp if tp == 1 else 512 // tp
            vocab_rows = max(0, min(vocab, (tp_rank + 1) * rows_per_rank) - tp_rank * rows_per_rank)
            expected = (layers // pp) * (per_layer_split // tp + norms)
            if pp_rank == 0:
                expected += vocab_rows * h * 4
            if pp_rank == pp - 1:
                expected += vocab_rows * h * 4 + h * 4
            assert result[f"tp{tp}pp{pp}/bytes"] == expected, (tp, pp, tp_rank, pp_rank)
    whole = (job["untied"] / "model.safetensors").stat().st_size
    assert job["per_rank"][0]["tp1pp1/bytes"] > 0.99 * whole  # TP1 x PP1 reads the whole file (minus header)


def test_torch_dist_saved_at_tp2_loads_at_pp2_with_identical_logits(job):
    res = job["res"]
    # bit-identical to the same PP2 layout loaded straight from HF (TP2 itself sums in another order)
    assert np.array_equal(res["ckpt_pp2/batch"], res["tp1pp2/batch"])
    assert _rel(res["ckpt_pp2/batch"][..., :300], res["tp2pp1/batch"][..., :300]) <= 1e-5
    meta = res["ckpt_meta"]
    assert meta["format"] == "megapack-torch-dist-v1" and meta["iteration"] == 7
    assert meta["tokenizer_identity"] == "tok:sha256:abc" and meta["hf_config"]["vocab_size"] == 300
    assert meta["saved_with"] == {"tp": 2, "pp": 1}


@pytest.mark.parametrize("variant", ["untied", "tied"])
def test_export_at_tp2_pp2_is_bit_identical_and_loads_in_transformers(job, variant):
    from safetensors.torch import load_file

    src = job[variant]
    out = job["root"] / f"export_{variant}"
    original = load_file(str(src / "model.safetensors"))
    exported = {}
    for file in sorted(out.glob("*.safetensors")):
        exported.update(load_file(str(file)))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    if variant == "tied":
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and "lm_head.weight" not in exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert model.config.vocab_size == 300


def test_import_errors_name_the_tensor_and_file(job):
    res = job["res"]
    bad_shape = res["bad_shape"]
    assert "mlp.gate_proj.weight" in bad_shape and "[128, 64]" in bad_shape and "[96, 64]" in bad_shape
    assert "model-00002-of-00002.safetensors" in res["bad_shard"] and "missing" in res["bad_shard"]
    assert "\n" not in res["bad_shape"] + res["bad_shard"]
