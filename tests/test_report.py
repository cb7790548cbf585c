"""`megapack report` and `megapack inspect --plot`: hand-written runs (exact table cells, figure contents, per-dataset
numbers, one-line errors) and one real small demo run (two arms) whose report, figures and padding numbers are checked
against what the trainer logged."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from megapack.cli import main
from megapack.report.document import write_report
from megapack.report.figures import FIGURES
from megapack.report.runs import load_run
from megapack.training.run.metrics import summary

PNG = b"\x89PNG\r\n\x1a\n"
STEMS = [f.stem for f in FIGURES]


def _write_run(run_dir, packing, *, losses, conversations, packs, real, total, target, step_time, valid,
               extra=None, interval=1, summary_extra=None):
    """A run directory as the trainer writes it: one record per logged step, validations, summary.json."""
    run_dir.mkdir(parents=True)
    lines = []
    for step, loss in enumerate(losses, 1):
        if step % interval and step != len(losses):
            continue
        rec = {"kind": "train", "step": step, "loss": loss, "grad_norm": 0.5, "lr": 1e-3, "real_tokens": real,
               "total_tokens": total, "trained_tokens": target, "conversations": conversations, "packs": packs,
               "step_time_s": step_time, "tokens_per_s": real / step_time, "trained_tokens_per_s": target / step_time,
               "conversations_per_s": conversations / step_time, "packs_per_s": packs / step_time,
               "padding_fraction": 1 - real / total, "epoch": step / len(losses)}
        lines.append(rec | (extra or {}).get(step, {}))
        if step in valid:
            lines.append({"kind": "valid", "step": step, "valid_loss": valid[step]} | (extra or {}).get(-step, {}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    n = len(losses)
    result = summary(epochs=1.0, steps=n, train_time_s=n * step_time, packs=n * packs, conversations=n * conversations,
                     tokens=n * real, trained_tokens=n * target, final_loss=losses[-1],
                     final_valid_loss=valid[max(valid)], packing=packing)
    (run_dir / "summary.json").write_text(json.dumps(result | {"interrupted": False} | (summary_extra or {})))


def _two_runs(root):
    """runs/train/{padding,bfd} plus things a run folder also holds (a log, an old report)."""
    train = root / "runs" / "train"
    _write_run(train / "padding", "padding", losses=[11.8, 11.5, 11.1, 10.9], conversations=8, packs=8, real=1600,
               total=3200, target=1400, step_time=4.0, valid={2: 11.3, 4: 10.95})
    extra = {1: {"dataset/alpaca/loss": 11.7, "dataset/alpaca/conversations": 11, "dataset/wild/chat/loss": 11.9},
             2: {"dataset/alpaca/loss": 10.7, "dataset/alpaca/conversations": 12, "dataset/wild/chat/loss": None},
             -2: {"dataset/alpaca/valid_loss": 10.8}}
    _write_run(train / "bfd", "bfd", losses=[11.4, 10.8], conversations=20, packs=8, real=4000, total=4000,
               target=3500, step_time=3.0, valid={2: 10.85}, extra=extra,
               summary_extra={"dataset/alpaca/trained_tokens": 2000})
    (train / "train.log").write_text("training ...\n")
    (train / "report").mkdir()
    return train


def test_report_tables_and_figures_of_hand_written_runs(tmp_path, capsys):
    train = _two_runs(tmp_path)
    assert main(["report", str(train)]) == 0
    out_dir = tmp_path / "runs" / "report"  # default: beside the folder of runs
    assert f"2 runs (padding, bfd), 8 figures: wrote {out_dir / 'report.md'}" in capsys.readouterr().out
    text = (out_dir / "report.md").read_text()
    # padding: 4 steps of 4 s, 8 packs = 8 conversations of 1600 real tokens each; bfd: 2 steps of 3 s, 8 packs of
    # 20 conversations and 4000 tokens each (runs in packing order, not by name)
    assert ("| run | packing | epochs | steps | time (s) | steps/s | packs/s | conv/s | tokens/s | final loss | "
            "final valid loss |") in text
    assert "| padding | padding | 1.00 | 4 | 16.0 | 0.250 | 2.00 | 2.00 | 400 | 10.9000 | 10.9500 |" in text
    assert "| bfd | bfd | 1.00 | 2 | 6.0 | 0.333 | 2.67 | 6.67 | 1333 | 10.8000 | 10.8500 |" in text
    assert text.index("| padding |") < text.index("| bfd |")
    # per dataset: the last logged non-null value, summary.json's numbers, dataset names with slashes
    assert "| run | dataset | conversations | loss | trained_tokens | valid_loss |" in text
    assert "| bfd | alpaca | 12 | 10.7 | 2000 | 10.8 |" in text
    assert "| bfd | wild/chat | - | 11.9 | - | - |" in text
    for stem in STEMS:
        png = out_dir / f"{stem}.png"
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 10_000, stem
        assert f"]({stem}.png)" in text

    report = write_report([train / "padding", train / "bfd"], tmp_path / "out")
    figs = {f["file"][:-4]: f for f in report.figures}
    assert list(figs) == STEMS
    for f in figs.values():
        assert f["legend"] == ["padding", "bfd"] and [line["label"] for line in f["lines"]] == ["padding", "bfd"]
        assert f["title"] and f["xlabel"] and f["ylabel"]
    points = {stem: [line["points"] for line in f["lines"]] for stem, f in figs.items()}
    last = {stem: [line["last"] for line in f["lines"]] for stem, f in figs.items()}
    assert points["loss_vs_step"] == [4, 2] and points["valid_loss"] == [2, 1]
    assert last["loss_vs_step"] == [[4, 10.9], [2, 10.8]]
    assert last["loss_vs_time"] == [[16.0, 10.9], [6.0, 10.8]]
    assert last["loss_vs_conversations"] == [[32, 10.9], [40, 10.8]]
    assert last["padding_fraction"] == [[4, 50.0], [2, 0.0]]
    assert last["tokens_per_s"] == [[4, 400.0], [2, pytest.approx(4000 / 3)]]  # real tokens, as the table
    assert last["learning_rate"] == [[4, 1e-3], [2, 1e-3]]
    assert last["conversations_per_s"] == [[4, 2.0], [2, pytest.approx(20 / 3)]]
    assert last["valid_loss"] == [[32, 10.95], [40, 10.85]]  # against conversations seen
    assert figs["loss_vs_time"]["xlabel"] == "training time (s, sum of step times)"
    assert figs["padding_fraction"]["ylabel"] == "padding (% of the tokens computed)"


def test_logging_interval_resume_and_stale_figures(tmp_path):
    run_dir = tmp_path / "bfd"
    _write_run(run_dir, "bfd", losses=[11.0, 10.9, 10.8, 10.7, 10.6], conversations=10, packs=4, real=400, total=400,
               target=300, step_time=2.0, valid={5: 10.5}, interval=2)
    with open(run_dir / "metrics.jsonl", "a") as fh:  # a resume from step 3 logs step 4 again: the last one wins
        fh.write(json.dumps({"kind": "train", "step": 4, "loss": 10.65, "conversations": 10, "step_time_s": 2.0}) + "\n")
    run = load_run(run_dir)
    assert run.steps().tolist() == [2, 4, 5] and run.values("loss").tolist() == [10.9, 10.65, 10.6]
    assert run.resumes == [3]  # step 4 logged again: resumed after step 3
    # logged every 2 steps: each record stands for the steps since the previous one
    assert run.cumulative("conversations").tolist() == [20, 40, 50]
    assert run.cumulative("step_time_s").tolist() == [4.0, 8.0, 10.0]
    out = tmp_path / "report"
    out.mkdir()
    (out / "valid_loss.png").write_bytes(PNG)  # an earlier report's figure
    (run_dir / "metrics.jsonl").write_text("".join(
        line + "\n" for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"valid"' not in line))
    report = write_report([run_dir], out)
    assert "valid_loss.png" not in {f["file"] for f in report.figures} and not (out / "valid_loss.png").exists()
    assert "### Validation loss against conversations seen\n\nNo run logged a value for it." in report.path.read_text()


def test_runs_of_the_same_name_are_told_apart(tmp_path):
    from megapack.report.runs import find_runs

    for parent, loss in (("a", 10.5), ("b", 10.25)):
        _write_run(tmp_path / parent / "bfd", "bfd", losses=[11.0, loss], conversations=4, packs=2, real=100,
                   total=100, target=80, step_time=1.0, valid={2: loss})
    runs = find_runs([tmp_path / "b" / "bfd", tmp_path / "a" / "bfd", tmp_path / "b" / "bfd"])
    assert [r.name for r in runs] == ["b/bfd", "a/bfd"]  # the given order; a repeated path once
    text = write_report([tmp_path / "b" / "bfd", tmp_path / "a" / "bfd"]).path.read_text()
    assert "| b/bfd | bfd | 1.00 | 2 | 2.0 | 1.000 | 2.00 | 4.00 | 100 | 10.2500 | 10.2500 |" in text
    assert (tmp_path / "b" / "report" / "report.md").is_file()  # default: beside the first path


def _broken(tmp_path, name, metrics=None, summary_text=None):
    run_dir = tmp_path / name
    _write_run(run_dir, "bfd", losses=[11.0, 10.9], conversations=4, packs=2, real=100, total=100, target=80,
               step_time=1.0, valid={2: 10.8})
    if metrics is not None:
        (run_dir / "metrics.jsonl").write_text(metrics)
    if summary_text is not None:
        (run_dir / "summary.json").write_text(summary_text)
    return run_dir


def test_unreadable_inputs_are_one_line_naming_the_file(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cut = _broken(tmp_path, "cut", metrics='{"kind": "train", "step": 1, "loss": 11.0}\n{"kind": "train", "ste\n')
    no_loss = _broken(tmp_path, "no_loss", metrics='{"kind": "train", "step": 1, "lr": 0.1}\n')
    bad_summary = _broken(tmp_path, "bad_summary", summary_text="[1, 2]")
    no_summary = _broken(tmp_path, "no_summary")
    (no_summary / "summary.json").unlink()
    cases = {
        tmp_path / "missing": f"{tmp_path / 'missing'}: not found",
        empty: f"{empty}: no metrics.jsonl here or in its subfolders",
        cut: f"{cut / 'metrics.jsonl'}:2: not JSON",
        no_loss: f"{no_loss / 'metrics.jsonl'}:1: a train record without 'loss'",
        bad_summary: f"{bad_summary / 'summary.json'}: expected a JSON object, found list",
        no_summary: f"{no_summary / 'summary.json'}: not found",
    }
    for path, message in cases.items():
        assert main(["report", str(path), "--output", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_padded_micro_batches_by_hand():
    from megapack.data.packs.padding import PADDED_ARM_MULTIPLE, padded_micro_batches
    from megapack.training.run import batch as data

    assert data.PADDED_ARM_MULTIPLE is PADDED_ARM_MULTIPLE == 8
    real, computed = padded_micro_batches(np.array([5, 17, 9, 30, 3]), np.arange(5), 2)
    # (5, 17) -> 2 x 24; (9, 30) -> 2 x 32; (3,) -> 1 x 8
    assert real.tolist() == [22, 39, 3] and computed.tolist() == [48, 64, 8]
    real, computed = padded_micro_batches(np.array([5, 17, 9, 30, 3]), np.array([3, 0, 1, 2, 4]), 4)
    assert real.tolist() == [61, 3] and computed.tolist() == [128, 8]


def test_inspect_defaults_are_the_trainers():
    from megapack.cli import build_parser
    from megapack.training.preflight.config import TrainingConfig

    args = build_parser().parse_args(["inspect", "shards"])
    assert args.micro_batch_size == TrainingConfig.model_fields["micro_batch_size"].default
    assert args.train_seed == TrainingConfig.model_fields["seed"].default


# ------------------------------------------------------------------------------------------- one real small run


@pytest.mark.multiprocess
def test_demo_writes_a_report_of_its_runs(shrunk_demo, tmp_path):
    workdir, out = shrunk_demo
    assert f"report (loss, throughput and padding figures): {workdir / 'report' / 'report.md'}" in out
    text = (workdir / "report" / "report.md").read_text()
    rows = json.loads((workdir / "table3.json").read_text())["runs"]
    for r in rows:
        row = (f"| {r['packing']} | {r['packing']} | {r['epochs']:.2f} | {r['total_steps']} | "
               f"{r['total_training_time_s']:.1f} | {r['steps_per_s']:.3f} | {r['packs_per_s']:.2f} | "
               f"{r['conversations_per_s']:.2f} | {r['tokens_per_s']:.0f} | {r['final_loss']:.4f} | "
               f"{r['final_valid_loss']:.4f} |")
        assert row in text
    for stem in STEMS:
        assert (workdir / "report" / f"{stem}.png").read_bytes()[:8] == PNG
    report = write_report([workdir / "train"], tmp_path / "again")
    figs = {f["file"][:-4]: f for f in report.figures}
    assert list(figs) == STEMS
    for i, r in enumerate(rows):
        metrics = [json.loads(line) for line in (workdir / "train" / r["packing"] / "metrics.jsonl").open()]
        train = [m for m in metrics if m["kind"] == "train"]
        assert figs["loss_vs_step"]["lines"][i] == {"label": r["packing"], "points": r["total_steps"],
                                                    "last": [r["total_steps"], r["final_loss"]]}
        seen = sum(m["conversations"] for m in train)
        assert figs["valid_loss"]["lines"][i]["last"] == [seen, r["final_valid_loss"]]
        assert figs["loss_vs_conversations"]["lines"][i]["last"] == [seen, r["final_loss"]]
        assert seen == round(r["conversations_per_s"] * r["total_training_time_s"])
        assert figs["loss_vs_time"]["lines"][i]["last"][0] == pytest.approx(r["total_training_time_s"], abs=1e-3)
    pad = [line["last"][1] for line in figs["padding_fraction"]["lines"]]
    assert pad[0] > 5.0 and pad[1] == 0.0  # the padding arm pads its micro-batches, packs are not padded


@pytest.mark.multiprocess
def test_inspect_plot_shows_the_trainers_padding(shrunk_demo, tmp_path, capsys):
    from megapack.data.packs.views import micro_batch_fill, plot
    from megapack.data.packs.shards import ShardDataset

    workdir, _ = shrunk_demo
    png = tmp_path / "padding.png"
    # the demo's padding arm: micro_batch_size 4, global batch 8 (DP2: one micro-batch per rank), training.seed 1234
    assert main(["inspect", str(workdir / "shards" / "padding"), "--plot", str(png), "--micro-batch-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert png.read_bytes()[:8] == PNG
    ds = ShardDataset(workdir / "shards" / "padding")
    numbers = plot(ds, tmp_path / "again.png", micro_batch_size=4)
    split = ds.meta["splits"]["train"]
    assert f"padded micro-batches (micro_batch_size 4): {numbers['micro_batches']}, " \
           f"{numbers['padding_fraction']:.1%} of the tokens computed are padding" in printed
    assert numbers["micro_batches"] == -(-split["num_conversations"] // 4)
    caption = numbers["caption"]
    for value in (f"{split['num_conversations']} conversations", f"{split['truncated']} truncated",
                  f"{split['num_packs']} packs",
                  f"lower bound {split['lower_bound_packs']}", f"packing efficiency {split['packing_efficiency']:.1%}",
                  f"{numbers['padding_fraction']:.1%} padding", "micro_batch_size 4"):
        assert value in caption, value
    # the trainer's micro-batches of the steps inside epoch 0 are exactly the first ones the plot counts
    real, computed = micro_batch_fill(ds, 4, 1234)
    steps = [json.loads(line) for line in (workdir / "train" / "padding" / "metrics.jsonl").open()]
    full = len(ds) // 8
    logged = [s for s in steps if s["kind"] == "train" and s["step"] <= full]
    assert full >= 2 and len(logged) == full
    assert sum(s["total_tokens"] for s in logged) == int(computed[: 2 * full].sum())
    assert sum(s["real_tokens"] for s in logged) == int(real[: 2 * full].sum())
    assert numbers["padding_fraction"] == pytest.approx(1 - real.sum() / computed.sum())
    # packed shards: pack fill against seq_length, and their numbers on the figure
    numbers = plot(ShardDataset(workdir / "shards" / "greedy"), tmp_path / "greedy.png")
    assert "padding_fraction" not in numbers and re.search(r"\d+ packs \(lower bound \d+\)", numbers["caption"])


def _figure(stem: str):
    return next(f for f in FIGURES if f.stem == stem)


def test_learning_rate_figure_and_resume_marks(tmp_path):
    lrs = {step: {"lr": 1e-3 * step} for step in range(1, 6)}
    for name in ("recorded", "restarted"):
        _write_run(tmp_path / name, "bfd", losses=[11.0, 10.9, 10.8, 10.7, 10.6], conversations=10, packs=4, real=400,
                   total=400, target=300, step_time=2.0, valid={5: 10.5}, extra=lrs)
    resumed = [{"kind": "train", "step": s, "loss": 10.0 - s / 10, "lr": 1e-3 * s, "conversations": 10,
                "step_time_s": 2.0} for s in (4, 5)]
    with open(tmp_path / "recorded" / "metrics.jsonl", "a") as fh:  # the trainer's resume record after step 3
        fh.write(json.dumps({"kind": "resume", "step": 3, "checkpoint": "ck/iter_0000003"}) + "\n")
        fh.writelines(json.dumps(r) + "\n" for r in resumed)
    with open(tmp_path / "restarted" / "metrics.jsonl", "a") as fh:  # an older file: only the steps start again
        fh.writelines(json.dumps(r | {"step": r["step"] - 1}) + "\n" for r in resumed)
    recorded, restarted = load_run(tmp_path / "recorded"), load_run(tmp_path / "restarted")
    assert recorded.resumes == [3] and restarted.resumes == [2]
    assert load_run(tmp_path / "recorded").steps().tolist() == [1, 2, 3, 4, 5]
    lr = _figure("learning_rate")
    x, y = lr.series(recorded)
    assert x.tolist() == [1, 2, 3, 4, 5] and y.tolist() == pytest.approx([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])
    assert lr.ylabel == "learning rate" and lr.xlabel == "optimizer step"
    # resume marks on the loss figures, at the resumed step's place on each x-axis
    assert _figure("loss_vs_step").marks(recorded).tolist() == [3]
    assert _figure("loss_vs_conversations").marks(recorded).tolist() == [30]
    assert _figure("loss_vs_time").marks(recorded).tolist() == [6.0]
    assert _figure("loss_vs_step").marks(restarted).tolist() == [2]
    report = write_report([tmp_path / "recorded", tmp_path / "restarted"], tmp_path / "out")
    figs = {f["file"][:-4]: f for f in report.figures}
    assert figs["learning_rate"]["lines"][0]["last"] == [5, pytest.approx(5e-3)]
    assert figs["loss_vs_step"]["resumes"] == [{"label": "recorded", "x": [3.0]}, {"label": "restarted", "x": [2.0]}]
    assert "resumed" in report.path.read_text()


def test_validation_against_conversations_and_throughput_in_real_tokens(tmp_path):
    from megapack.report.runs import find_runs

    runs = {run.name: run for run in find_runs([_two_runs(tmp_path)])}
    valid = _figure("valid_loss")
    assert valid.xlabel == "conversations seen"
    # padding: 8 conversations a step, validated after steps 2 and 4; bfd: 20 a step, validated after step 2
    assert valid.series(runs["padding"])[0].tolist() == [16, 32]
    assert valid.series(runs["bfd"])[0].tolist() == [40]
    throughput = _figure("tokens_per_s")
    assert "real tokens" in throughput.ylabel
    # the figure counts what the table's tokens/s counts: real (conversation) tokens, padding excluded
    for name, run in runs.items():
        x, y = throughput.series(run)
        assert y.mean() == pytest.approx(run.summary["tokens_per_s"]), name
    assert throughput.series(runs["padding"])[1].tolist() == [400.0] * 4
