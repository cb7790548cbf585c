"""Single-process unit tests of the trainer's config, micro-batch construction, sampler and metrics."""
from __future__ import annotations


import numpy as np
import pytest

from megapack.data.packs.shards import Pack
from megapack.errors import MegapackError
from megapack.training.preflight.config import load_config
from megapack.training.run.batch import build_batch
from megapack.training.run.sampler import TrainSampler, validation_batches
from megapack.model.flops import model_flops
from megapack.training.run.metrics import format_table

BASE = {
    "model": {"hf_dir": "/m"},
    "data": {"path": "/d", "seq_length": 64},
    "training": {"global_batch_size": 8, "train_steps": 5},
}


VOCAB_A, VOCAB_B = "vocab:" + "a" * 64, "vocab:" + "b" * 64


def cfg(*overrides: str, raw: dict | None = None):
    import copy

    return load_config(None, list(overrides), raw=copy.deepcopy(raw or BASE))


def test_config_types_and_overrides():
    c = cfg("optimizer.lr=3e-4", "parallel.tp=2", "training.loss_reduction=sample", "checkpoint.dir=null")
    assert c.optimizer.lr == pytest.approx(3e-4) and c.parallel.tp == 2
    assert c.training.loss_reduction == "sample" and c.checkpoint.dir is None
    assert cfg().checkpoint.async_save == "auto" and cfg("checkpoint.async_save=false").checkpoint.async_save is False
    with pytest.raises(MegapackError, match="checkpoint.async_save"):
        cfg("checkpoint.async_save=sometimes")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.lrr=1", "command line: optimizer.lrr=1: unknown key"),
        ("parallel.tp=two", "command line: parallel.tp=two: Input should be a valid integer"),
        ("training.loss_reduction=mean", "command line: training.loss_reduction=mean:"),
        ("training.global_batch_tokens=128", "training.global_batch_size/global_batch_tokens: set exactly one"),
        ("optimizer.min_lr=1", "optimizer.min_lr: 1.0 is larger than optimizer.lr"),
        ("model.init=megatron", "model.megatron_checkpoint: required"),
        ("nonsense", "override 'nonsense': expected key.sub=value"),
    ],
)
def test_config_errors_are_one_line_and_name_the_key(override, expected):
    with pytest.raises(MegapackError) as err:
        cfg(override)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {hf_dir: /m}\ndata: [unclosed\n")
    with pytest.raises(MegapackError, match=r"bad.yaml: line \d+ invalid YAML"):
        load_config(bad)
    with pytest.raises(MegapackError, match="missing.yaml: config file not found"):
        load_config(tmp_path / "missing.yaml")


def _plan_inputs(tmp_path, meta: dict | None = None, checkpoint_tokenizer: str | None = None) -> dict:
    """A shard directory (meta.json only), a tiny config.json and, optionally, a checkpoint to initialise from."""
    import json

    from megapack.model.tiny_checkpoint import tiny_llama_config

    shards, hf = tmp_path / "shards", tmp_path / "hf"
    shards.mkdir(parents=True, exist_ok=True)
    hf.mkdir(parents=True, exist_ok=True)
    base = {"format_version": 2, "seq_length": 64, "pad_to_multiple": 8, "packing": "greedy", "pad_id": 0,
            "tokenizer_identity": VOCAB_A, "splits": {"train": {"num_packs": 20, "shards": []}}}
    (shards / "meta.json").write_text(json.dumps(base | (meta or {})))
    (hf / "config.json").write_text(json.dumps(tiny_llama_config(num_layers=4)))  # 4 heads, 2 KV heads
    # meta.json without shard files: file verification off (tests/test_verify.py covers it on real shards)
    raw = {"model": {"hf_dir": str(hf)}, "data": {"path": str(shards), "verify": "off"},
           "training": {"global_batch_size": 8, "train_steps": 5}}
    if checkpoint_tokenizer:
        ck = tmp_path / "ck"
        ck.mkdir(exist_ok=True)
        (ck / "megapack.json").write_text(json.dumps({"format": "megapack-torch-dist-v1",
                                                      "tokenizer_identity": checkpoint_tokenizer}))
        raw["model"] |= {"init": "megatron", "megatron_checkpoint": str(ck)}
    return raw


def test_batch_layout_and_plan_checks(tmp_path, monkeypatch):
    from megapack.training.preflight import resume
    from megapack.training.preflight.plan import batch_layout, preflight

    # the stand-in checkpoint to initialise from is megapack.json alone (test_checkpoint_safety.py checks real ones)
    monkeypatch.setattr(resume, "checkpoint_problem", lambda path: None)

    raw = _plan_inputs(tmp_path)
    assert batch_layout(cfg("parallel.tp=2", raw=raw), 8, 64) == (4, 8, 2)
    assert batch_layout(cfg("training.global_batch_size=null", "training.global_batch_tokens=256", raw=raw), 2, 64) \
        == (2, 4, 2)
    plan = preflight(cfg("parallel.tp=2", raw=raw), 4, cuda=False)
    assert (plan.seq_length, plan.row_length) == (64, 64)  # from meta.json: the config does not ask for it
    assert preflight(cfg("training.micro_batch_size=2", raw=raw), 1, cuda=False).row_length == 128
    assert (plan.dp, plan.num_microbatches, plan.total_steps, plan.precision, plan.async_save) == \
        (2, 4, 5, "fp32", False)
    assert plan.attention_backend == "sdpa" and plan.tokenizer_identity == VOCAB_A and plan.resume_from is None
    assert preflight(cfg("training.train_steps=null", "training.epochs=2", raw=raw), 1, cuda=False).total_steps == 5
    cases = [
        (cfg("parallel.tp=2", "parallel.pp=2", raw=raw), 6, "parallel.tp/parallel.cp/parallel.pp: world size 6"),
        (cfg("parallel.cp=4", raw=raw), 6, "parallel.cp: world size 6 is not divisible by tp*cp*pp = 1*4*1 = 4"),
        (cfg("parallel.cp=2", "model.attention_backend=te", raw=raw), 2,
         "parallel.cp: 2 with model.attention_backend 'te' is not supported"),
        (cfg("parallel.cp=2", "parallel.pp=2", "parallel.vpp=2", raw=raw), 4,
         "parallel.cp: 2 with parallel.vpp 2 is not supported"),
        (cfg("training.micro_batch_size=3", raw=raw), 2, "training.global_batch_size: 8 is not divisible"),
        (cfg("data.seq_length=128", raw=raw), 1, "data.seq_length: run uses 128 but shards"),  # a stale guard
        (cfg("data.pad_to_multiple=16", raw=raw), 1, "data.pad_to_multiple: run uses 16"),
        (cfg("training.global_batch_size=null", "training.global_batch_tokens=100", raw=raw), 1,
         "training.global_batch_tokens: 100 is not a multiple"),
        # the model: 4 heads / 2 KV heads / 4 layers (fails today only inside build_model)
        (cfg("parallel.tp=4", raw=raw), 4, "parallel.tp: 4 must divide num_attention_heads (4) and "
                                           "num_key_value_heads (2)"),
        (cfg("parallel.pp=3", raw=raw), 3, "parallel.pp: 3 must divide num_hidden_layers (4)"),
        (cfg("parallel.sequence_parallel=true", raw=raw), 1, "parallel.sequence_parallel: needs parallel.tp > 1"),
        (cfg(raw=_plan_inputs(tmp_path / "b", checkpoint_tokenizer=VOCAB_B)), 1,
         f"data.path: tokenizer identity {VOCAB_A} of the shards in {tmp_path}/b/shards differs from the "
         f"checkpoint's {VOCAB_B}"),
    ]
    for config, world, expected in cases:
        with pytest.raises(MegapackError) as info:
            preflight(config, world, cuda=False)
        assert expected in str(info.value) and "\n" not in str(info.value)


def test_check_refuses_a_tp_that_does_not_divide_the_heads(tmp_path, capsys):
    import yaml

    from megapack.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_plan_inputs(tmp_path)))
    assert main(["train", "--config", str(path), "--check", "--world-size", "4", "parallel.tp=4"]) == 1
    assert capsys.readouterr().err.strip().startswith("error: parallel.tp: 4 must divide num_attention_heads")
    assert main(["train", "--config", str(path), "--check", "--world-size", "4", "parallel.tp=2"]) == 0
    import json

    plan = json.loads(capsys.readouterr().out.splitlines()[-1])["plan"]
    assert plan["dp"] == 2 and "auto" not in {plan["precision"], plan["attention_backend"], plan["async_save"]}


def test_resolved_config_records_what_ran(tmp_path):
    from megapack.training.preflight.plan import preflight, resolved_config

    config = cfg(raw=_plan_inputs(tmp_path))
    assert config.training.precision == "auto" and config.model.attention_backend == "auto"
    saved = resolved_config(config, preflight(config, 1, cuda=False))
    assert saved["training"]["precision"] == "fp32" and saved["model"]["attention_backend"] == "sdpa"
    assert saved["checkpoint"]["async_save"] is False and saved["derived"]["total_steps"] == 5
    assert "auto" not in yaml_text(saved)


def yaml_text(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data)


def test_tokenizer_identities_compare_by_equality():
    from megapack.training.preflight.plan import same_tokenizer, tokenizer_identity

    assert same_tokenizer(VOCAB_A, VOCAB_A) is True and same_tokenizer(VOCAB_A, VOCAB_B) is False
    # identities recorded before vocab identities existed (file digests) are not compared
    assert same_tokenizer("tiktoken-llama3:82e9d31979e92ab9", VOCAB_A) is None
    old_checkpoint = "original/tokenizer.model:sha256:82e9d319" + "0" * 56
    assert same_tokenizer("tiktoken-llama3:82e9d31979e92ab9", old_checkpoint) is None
    assert same_tokenizer(None, VOCAB_A) is None and same_tokenizer(VOCAB_A, "") is None
    # one key name; metadata written before it had one is still read
    assert tokenizer_identity({"tokenizer_identity": VOCAB_A}) == tokenizer_identity({"tokenizer": VOCAB_A})


def pack(segments: list[list[int]], masks: list[list[int]], continues: bool = False,
         real: list[int] | None = None) -> Pack:
    """A pack of the shard format: tokens, loss_mask (1 = token is a target), real and padded boundaries."""
    lengths = [len(s) for s in segments]
    return Pack(
        tokens=np.array(sum(segments, []), np.int64),
        loss_mask=np.array(sum(masks, []), np.uint8),
        real_lengths=np.array(real if real is not None else lengths, np.int64),
        padded_lengths=np.array(lengths, np.int64),
        continues=continues,
    )


def test_thd_micro_batch_shifts_labels_within_segments():
    p1 = pack([[10, 11, 12, 13], [20, 21, 22]], [[0, 0, 1, 1], [0, 1, 1]])
    p2 = pack([[30, 31]], [[0, 1]])
    b = build_batch([p1, p2])
    assert b.cu_seqlens.tolist() == b.cu_seqlens_padded.tolist() == [0, 4, 7, 9] and b.max_seqlen == 4
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1]
    # position i predicts token i+1 of the same segment; the last position of a segment predicts nothing
    assert b.targets.tolist() == [11, 12, 13, 0, 21, 22, 0, 31, 0]
    assert b.loss_weight.tolist() == [0, 1, 1, 0, 1, 1, 0, 1, 0]
    assert b.loss_denominator == 5
    assert b.stats == {"real_tokens": 9, "total_tokens": 9, "trained_tokens": 5, "conversations": 3, "packs": 2,
                       "seq_sq_sum": 16 + 9 + 4}
    s = build_batch([p1, p2], reduction="sample")
    assert s.loss_denominator == 3
    assert np.allclose(s.loss_weight, [0, 0.5, 0.5, 0, 0.5, 0.5, 0, 1, 0])
    # with `random` packing, a pack opening with the rest of a conversation does not count it again
    assert build_batch([p1, pack([[30, 31]], [[0, 1]], continues=True)]).stats["conversations"] == 2


def test_padded_micro_batch_rounds_to_multiple_of_8():
    convs = [pack([[1] * 5], [[0, 0, 1, 1, 1]]), pack([[2] * 11], [[0] * 6 + [1] * 5])]
    b = build_batch(convs, padded=True)
    assert b.cu_seqlens_padded.tolist() == [0, 16, 32] and b.cu_seqlens.tolist() == [0, 5, 16]
    assert len(b.tokens) == 32
    assert b.loss_weight.sum() == 3 + 5 and b.loss_weight[5:16].sum() == 0
    assert b.tokens[5:16].tolist() == [0] * 11
    assert b.stats["real_tokens"] == 16 and b.stats["total_tokens"] == 32 and b.stats["conversations"] == 2


def test_sampler_is_deterministic_and_dp_invariant():
    def step_sets(dp: int, steps: int, consumed: int = 0) -> list[list[int]]:
        samplers = [TrainSampler(10, 4, 1, r, dp, seed=7, consumed_packs=consumed) for r in range(dp)]
        out = []
        for _ in range(steps):
            out.append(sorted(i for s in samplers for mb in s.next_step() for i in mb))
        return out

    one, two = step_sets(1, 6), step_sets(2, 6)
    assert one == two
    first_epoch = [i for s in TrainSampler(10, 10, 1, 0, 1, seed=7).next_step() for i in s]
    assert sorted(first_epoch) == list(range(10)) and first_epoch != list(range(10))
    # resuming from a data position continues the same stream, also on another DP size
    assert step_sets(2, 3, consumed=12) == one[3:]


def test_validation_batches_cover_each_sample_once():
    for dp in (1, 2, 3):
        seen = []
        counts = set()
        for r in range(dp):
            lists = validation_batches(7, 2, r, dp)
            counts.add(len(lists))
            seen += [i for mb in lists if mb for i in mb]
        assert sorted(seen) == list(range(7)) and len(counts) == 1


def test_model_flops_matches_transformers_parameter_count():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megapack.model.tiny_checkpoint import tiny_llama_config

    hf = tiny_llama_config(vocab_size=1000)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**hf))
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    assert model_flops(hf, 100, 0) == 6 * matmul * 100
    # causal attention: QK^T and AV over s^2/2 pairs, 2 FLOPs per MAC, x3 for the backward
    attn = model_flops(hf, 100, 100**2) - model_flops(hf, 100, 0)
    assert attn == 3 * 2 * 2 * hf["num_hidden_layers"] * hf["num_attention_heads"] * hf["head_dim"] * 100**2 / 2


def test_table_has_paper_columns():
    row = {"packing": "greedy", "epochs": 1.0, "total_steps": 10, "total_training_time_s": 5.0, "steps_per_s": 2.0,
           "packs_per_s": 8.0, "conversations_per_s": 20.0, "tokens_per_s": 5000.0, "final_loss": 1.5}
    text = format_table([row])
    for col in ("epochs", "steps", "time (s)", "steps/s", "packs/s", "conv/s", "tokens/s"):
        assert col in text.splitlines()[0]
    assert "greedy" in text and "2.000" in text


def test_segment_lengths_come_from_the_shards_not_from_pad_tokens():
    p = pack([[10, 11, 12, 99, 99], [20, 21, 99]], [[0, 1, 1, 0, 0], [0, 1, 0]], real=[3, 2])
    b = build_batch([p], pad_id=99)
    assert b.cu_seqlens.tolist() == [0, 3, 5] and b.cu_seqlens_padded.tolist() == [0, 5, 8]
    assert b.stats["real_tokens"] == 5 and b.stats["total_tokens"] == 8 and b.stats["conversations"] == 2
    assert b.stats["seq_sq_sum"] == 3**2 + 2**2  # real lengths only (MFU counts useful work)
    # a conversation whose last real token is the pad id with mask 0 (SentencePiece pads with </s>): 3 real tokens
    eos = build_batch([pack([[10, 11, 99, 99, 99]], [[0, 1, 0, 0, 0]], real=[3])], pad_id=99)
    assert eos.cu_seqlens.tolist() == [0, 3] and eos.stats["real_tokens"] == 3
    # padding arm: the longest real conversation (here 3 tokens) sets the width, rounded up to 8
    c = build_batch([pack([[10, 11, 12, 99, 99, 99, 99, 99, 99]], [[0, 1, 1] + [0] * 6], real=[3])],
                          padded=True, pad_id=99)
    assert len(c.tokens) == 8 and c.stats["real_tokens"] == 3 and c.targets[:2].tolist() == [11, 12]


def test_shipped_configs_validate():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        c = load_config(path)
        assert c.checkpoint.dir, path
    from megapack.training.preflight.plan import batch_layout, planned_seq_length

    big = load_config(configs[0].with_name("llama3_70b_packed_sft.yaml"))
    assert batch_layout(big, 32, planned_seq_length(big)) == (1, 64, 64)


def test_row_padded_for_sequence_parallel():
    p = pack([[10, 11, 12], [20, 21]], [[0, 1, 1], [0, 1]])
    b = build_batch([p], row_multiple=4, pad_id=99)
    assert b.cu_seqlens_padded.tolist() == [0, 3, 5, 8] and b.cu_seqlens.tolist() == [0, 3, 5, 5]
    assert b.tokens[5:].tolist() == [99, 99, 99]
    assert b.loss_weight.sum() == 3 and b.stats["real_tokens"] == 5 and b.stats["conversations"] == 2


def test_peak_flops_lookup():
    from megapack.model.flops import device_peak_flops

    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_flops(None) is None and device_peak_flops("Some CPU") is None


def test_cli_reports_config_errors_on_one_line(tmp_path, capsys):
    import yaml

    from megapack.cli import main

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE | {"training": {"global_batch_size": 8, "train_stepz": 5}}))
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: training.train_stepz: unknown key (did you mean 'training.train_steps'?)"
    path.write_text(yaml.safe_dump(BASE))
    assert main(["train", "--config", str(path), "--check", "data.path=" + str(tmp_path / "none")]) == 1
    assert "meta.json" in capsys.readouterr().err


def test_warmup_starts_above_zero_so_the_first_step_trains():
    import torch

    from megapack.training.preflight.config import OptimizerConfig
    from megapack.training.run.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    cfg = OptimizerConfig(lr=0.4, warmup_steps=3, decay_style="constant")
    sched = build_scheduler(cfg, opt, total_steps=6)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4])  # lr * k / (warmup + 1), then the full rate
