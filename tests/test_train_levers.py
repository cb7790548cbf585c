"""The memory levers on CPU/gloo: activation recompute (training.recompute) and virtual pipeline stages
(parallel.vpp, interleaved 1F1B), with a tiny 4-layer LLaMA-3-architecture model on packed, variable-length demo
shards (seq 128).

One launch (2 procs), module fixture `runs`: TP2 and PP2 each with recompute none | selective | full (peak activation
bytes held for backward measured per step with saved-tensor hooks; packed attention calls recorded at TP2 selective
and PP2 full) | PP2 x VPP2 (attention calls per model chunk recorded, HF export) | PP2 x VPP2 stopped by SIGUSR1
after step 1 (checkpoint) | PP2 x VPP2 resumed from that checkpoint.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from train_helpers import base_config, launch, losses, make_demo_shards, make_tiny_hf

STEPS, GBS, SEQ = 3, 2, 128
SEED = 310  # training.seed whose first 6 packs include 3 holding several conversations (5 of the 36 do)
RECOMPUTE = ("none", "selective", "full")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir):
    """A 4-layer tiny HF model, greedy shards of the demo data at seq 128, and a config builder."""
    w = tmp_path_factory.mktemp("levers")
    hf = make_tiny_hf(w / "hf4", num_layers=4)
    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, w / "greedy128", "greedy",
                              seq_length=SEQ)

    def cfg(name: str, **sections):
        merged = {"training": {"global_batch_size": GBS, "train_steps": STEPS, "seed": SEED}, "data": {"seq_length": SEQ,
                                                                                          "valid_split": None}}
        for k, v in sections.items():
            merged.setdefault(k, {}).update(v)
        return base_config(hf, shards, w / name, **merged)

    return {"dir": w, "hf": hf, "shards": shards, "cfg": cfg}


@pytest.fixture(scope="module")
def runs(inputs):
    """Launch the 2-process runs described in the module docstring, one after another."""
    w, cfg = inputs["dir"], inputs["cfg"]
    jobs = []
    for layout, parallel in (("tp2", {"tp": 2}), ("pp2", {"pp": 2})):
        for mode in RECOMPUTE:
            name = f"{layout}_{mode}"
            job = {"config": cfg(name, parallel=parallel, training={"recompute": mode}),
                   "activations": str(w / f"act_{name}")}
            if name in ("tp2_selective", "pp2_full"):
                job["attention_calls"] = str(w / f"att_{name}")
            jobs.append(job)
    vpp = {"pp": 2, "vpp": 2}
    jobs += [
        {"config": cfg("vpp", parallel=vpp, data={"valid_split": "val"},
                       checkpoint={"export_hf": str(w / "vpp_hf")}), "attention_calls": str(w / "att_vpp")},
        {"config": cfg("vpp_stopped", parallel=vpp, checkpoint={"dir": str(w / "ck_vpp")}), "signal_at_step": 1},
        {"config": cfg("vpp_resumed", parallel=vpp, checkpoint={"load": str(w / "ck_vpp")})},
    ]
    launch(2, jobs, w, "levers")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _read_ranks(prefix: Path) -> list:
    return [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in (0, 1)]


def _expected_cu(shards: Path, row_multiple: int = 1) -> list[list[int]]:
    """cu_seqlens (padded offsets) of every training micro-batch of the run, in order (1 pack per micro-batch);
    interleaved runs pad each row to seq_length (`row_multiple`)."""
    from megapack.data.packs.shards import ShardDataset
    from megapack.training.run.batch import build_batch
    from megapack.training.run.sampler import TrainSampler

    ds = ShardDataset(shards, "train")
    sampler = TrainSampler(len(ds), GBS, 1, 0, 1, seed=SEED)
    return [build_batch([ds[i] for i in mb], row_multiple=row_multiple).cu_seqlens_padded.tolist()
            for _ in range(STEPS) for mb in sampler.next_step()]


@pytest.mark.multiprocess
def test_recompute_gives_the_same_losses_with_less_activation_memory(inputs, runs):
    """selective and full recompute train exactly like none (<= 1e-6 relative, 3 steps) at TP2 and at PP2, while the
    transformer layers hold less activation memory for backward (measured with saved-tensor hooks, every rank)."""
    w = inputs["dir"]
    for layout in ("tp2", "pp2"):
        ref = losses(w / f"{layout}_none")
        assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1] - 1e-3  # the steps trained
        peak = {mode: [max(steps) for steps in _read_ranks(w / f"act_{layout}_{mode}")] for mode in RECOMPUTE}
        for mode in ("selective", "full"):
            other = losses(w / f"{layout}_{mode}")
            assert sorted(other) == sorted(ref), (layout, mode)
            worst = max(_rel(other[s], ref[s]) for s in ref)
            assert worst <= 1e-6, f"{layout} {mode}: relative loss difference {worst:.2e} ({ref} vs {other})"
        for rank in (0, 1):
            none, selective, full = (peak[m][rank] for m in RECOMPUTE)
            # selective drops the attention internals (softmax probabilities, masks: ~7-11% of this tiny model's
            # layer activations, far more at long sequences); full keeps each layer's input and, in backward, one
            # layer's activations at a time (half of none with PP2's 2 layers per rank, a quarter at TP2's 4)
            assert selective < 0.95 * none and full < 0.6 * none and full < selective, (layout, rank, peak)


@pytest.mark.multiprocess
def test_recompute_keeps_cu_seqlens_in_the_recomputed_attention(inputs, runs):
    """Every recomputation of the packed core attention in backward sees the micro-batch's own cu_seqlens."""
    w, expected = inputs["dir"], _expected_cu(inputs["shards"])
    assert any(len(cu) > 2 for cu in expected)  # some micro-batches hold several conversations
    for rank, calls in enumerate(_read_ranks(w / "att_tp2_selective")):
        for layer in (1, 2, 3, 4):
            seen = [cu for _, number, training, cu in calls if number == layer and training]
            # forward, then its recomputation in backward, micro-batch by micro-batch
            assert seen[0::2] == expected and seen[1::2] == expected, (rank, layer)
    for rank, calls in enumerate(_read_ranks(w / "att_pp2_full")):
        layers = {number for _, number, _, _ in calls}
        assert layers == ({1, 2} if rank == 0 else {3, 4})
        for layer in layers:
            seen = Counter(tuple(cu) for _, number, training, cu in calls if number == layer and training)
            assert seen == Counter(tuple(cu) for cu in expected * 2), (rank, layer)


@pytest.mark.multiprocess
def test_virtual_pipeline_stages_train_like_pp(inputs, runs):
    """PP2 x VPP2 (interleaved 1F1B, two model chunks per rank) gives PP2's losses and counts every conversation once."""
    w = inputs["dir"]
    ref, vpp = losses(w / "pp2_none"), losses(w / "vpp")
    assert sorted(vpp) == sorted(ref) == list(range(1, STEPS + 1))
    worst = max(_rel(vpp[s], ref[s]) for s in ref)
    assert worst <= 1e-5, (ref, vpp)
    from megapack.training.run.metrics import read_metrics

    pp_rec, vpp_rec = (read_metrics(w / name / "metrics.jsonl") for name in ("pp2_none", "vpp"))
    for s in ref:
        for key in ("conversations", "packs", "real_tokens", "trained_tokens"):
            assert vpp_rec[s][key] == pp_rec[s][key], (s, key)


@pytest.mark.multiprocess
def test_cu_seqlens_reach_every_virtual_stage(inputs, runs):
    """Each rank's two model chunks (layers 1 and 3 on rank 0, 2 and 4 on rank 1) run packed attention with every
    micro-batch's cu_seqlens, in order (rows padded to seq_length with one padding segment: megatron's p2p of
    interleaved stages needs fixed sizes at PP=2)."""
    w, expected = inputs["dir"], _expected_cu(inputs["shards"], row_multiple=SEQ)
    assert any(len(cu) > 3 for cu in expected) and all(cu[-1] == SEQ for cu in expected)
    for rank, calls in enumerate(_read_ranks(w / "att_vpp")):
        chunks = {(chunk, number) for chunk, number, _, _ in calls}
        assert chunks == ({(0, 1), (1, 3)} if rank == 0 else {(0, 2), (1, 4)}), chunks
        for chunk, number in chunks:
            seen = [cu for c, n, training, cu in calls if (c, n) == (chunk, number) and training]
            assert seen == expected, (rank, chunk)


@pytest.mark.multiprocess
def test_virtual_pipeline_checkpoint_resumes_on_the_same_curve(inputs, runs, tmp_path, capsys):
    """A PP2 x VPP2 run stopped after step 1 (checkpoint of both chunks) resumes on the uninterrupted curve; its
    dp_reshardable optimizer state is refused at another vpp before any process starts, in one line."""
    from megapack.cli import main
    from train_helpers import write_yaml

    w = inputs["dir"]
    full, resumed = losses(w / "vpp"), losses(w / "vpp_resumed")
    assert sorted(losses(w / "vpp_stopped")) == [1] and sorted(resumed) == [2, 3]
    assert all(_rel(resumed[s], full[s]) <= 1e-6 for s in resumed), (full, resumed)
    meta = json.loads((w / "ck_vpp" / "iter_0000001" / "megapack.json").read_text())
    assert meta["saved_with"] == {"tp": 1, "pp": 2, "dp": 1, "vpp": 2}
    config = inputs["cfg"]("pp2_from_vpp", parallel={"pp": 2}, checkpoint={"load": str(w / "ck_vpp")})
    assert main(["train", "--config", str(write_yaml(tmp_path / "run.yaml", config)), "--check"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: parallel.vpp:") and "saved at vpp=2" in err and "\n" not in err, err


@pytest.mark.multiprocess
def test_virtual_pipeline_export_reproduces_the_validation_loss(inputs, runs):
    """The HF export gathers both chunks of both ranks: transformers gives the trainer's final validation loss."""
    from train_helpers import hf_loss_on_split

    w = inputs["dir"]
    valid = losses(w / "vpp", kind="valid", key="valid_loss")[STEPS]
    total, count = hf_loss_on_split(w / "vpp_hf", inputs["shards"], "val")
    assert count > 50 and _rel(total / count, valid) <= 1e-5, (total / count, valid)


@pytest.mark.parametrize("parallel, training, message", [
    ({"pp": 2, "vpp": 4}, {}, "parallel.vpp: num_hidden_layers 4 (config.json in {hf}) is not divisible by "
                              "pp*vpp = 2*4"),
    ({"pp": 2, "vpp": 2}, {"global_batch_size": 3}, "parallel.vpp: interleaving needs the micro-batches per step on "
                                                   "each DP rank (3: training.global_batch_size / (micro_batch_size*dp))"
                                                   " to be a multiple of parallel.pp 2"),
])
def test_preflight_refuses_virtual_stages_megatron_cannot_run(inputs, parallel, training, message):
    from megapack.errors import MegapackError
    from megapack.training.preflight.config import load_config
    from megapack.training.preflight.plan import preflight

    config = load_config(None, [], raw=inputs["cfg"]("refused", parallel=parallel, training=training))
    with pytest.raises(MegapackError) as err:
        preflight(config, world_size=2)
    assert str(err.value) == message.format(hf=inputs["hf"])


def test_preflight_refuses_padding_rows_that_outgrow_the_interleaved_row(inputs, llama3_tokenizer_path,
                                                                         llamafactory_data_dir):
    """The padding arm pads to multiples of 8: at seq_length 124 a row could exceed the fixed size VPP sends."""
    from megapack.errors import MegapackError
    from megapack.training.preflight.config import load_config
    from megapack.training.preflight.plan import preflight

    shards = make_demo_shards(llamafactory_data_dir, llama3_tokenizer_path, inputs["dir"] / "padding124", "padding",
                              seq_length=124)
    raw = inputs["cfg"]("refused", parallel={"pp": 2, "vpp": 2}, data={"path": str(shards), "seq_length": None})
    with pytest.raises(MegapackError, match=r"^parallel\.vpp: padding shards are padded to multiples of 8, which "
                                            r"the shards' seq_length 124 is not"):
        preflight(load_config(None, [], raw=raw), world_size=2)
    raw["parallel"] = {"pp": 2}
    assert preflight(load_config(None, [], raw=raw), world_size=2).pp == 2  # without interleaving it is fine
