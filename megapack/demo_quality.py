"""The study in miniature on real weights (`megapack demo --model smollm2`): SmolLM2-135M-Instruct fine-tuned on
LLaMA-Factory's alpaca demo plus generated arithmetic chats with padding, random, greedy and bfd packing and the
contaminated bfd arm (cross-sample attention); every arm validated on the same held-out conversations and scored on
megapack's local lm-eval tasks before and after fine-tuning; a report with the quality and time tables."""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from megapack.data.packs.packing import PACKINGS
from megapack.errors import MegapackError

MODELS = {"smollm2": "smollm2-135m-instruct"}  # --model -> the HF folder asset (megapack.model.gguf_import)
CONTAMINATED = "bfd-cross"  # the study's contaminated arm: bfd packs, conversations attend to each other
TASKS = ("megapack_arithmetic", "megapack_capitals")
TASK_DIR = Path(__file__).resolve().parent / "evaluation" / "tasks"
SEED = 20261203


@dataclass
class QualityConfig:
    """Defaults of the real-model miniature (sized to finish within 30 minutes on 2 CPU cores)."""

    workdir: str = "runs/demo-smollm2"
    model: str = "smollm2"
    num_samples: int = 32  # alpaca_en_demo records trained on (8 more are held out for validation)
    arithmetic: int = 200  # generated arithmetic chats trained on (a quarter multi-turn)
    valid_arithmetic: int = 24  # held-out generated arithmetic chats validated on
    seq_length: int = 256
    packings: tuple[str, ...] = PACKINGS
    contaminated: bool = True
    nproc: int = 2
    global_batch_size: int = 8
    lr: float = 1e-4  # 3e-4 unlearned the arithmetic format in a measured run (MINIATURE.md)
    epochs: float = 1.0
    eval_limit: int | None = 40  # questions per local task (None: all)
    eval_batch_size: int = 16
    train: bool = True


@dataclass(frozen=True)
class Arm:
    """One fine-tuning arm: its name (run folder), the packing of its shards, and whether packed conversations see
    each other."""

    name: str
    packing: str
    cross_sample_attention: bool = False


def arms_of(cfg: QualityConfig) -> list[Arm]:
    """The packings asked for, plus the contaminated bfd arm when bfd is one of them."""
    arms = [Arm(p, p) for p in cfg.packings]
    if cfg.contaminated and "bfd" in cfg.packings:
        arms.append(Arm(CONTAMINATED, "bfd", True))
    return arms


def _question(rng: random.Random) -> tuple[str, str]:
    """One question in the local arithmetic task's style (two-digit operands, + or -, no negative results)."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return f"What is {a} {op} {b}?", str(a + b if op == "+" else a - b)


def task_questions() -> set[str]:
    """Every question of the shipped arithmetic task (few-shot pool and test): never generated for training."""
    found = set()
    for name in ("arithmetic_fewshot.jsonl", "arithmetic_test.jsonl"):
        path = TASK_DIR / name
        if not path.is_file():
            raise MegapackError(f"{path}: missing (the shipped arithmetic task's data; tools/make_eval_tasks.py)")
        found |= {json.loads(line)["question"] for line in path.read_text(encoding="utf-8").splitlines() if line}
    return found


def arithmetic_chats(count: int, seed: int, exclude: set[str]) -> list[dict]:
    """`count` chats in the openai format: three in four single-turn, the rest 2-4 questions in one conversation;
    no question of `exclude`, none repeated (so training and validation chats never share a question)."""
    rng = random.Random(seed)
    chats = []
    while len(chats) < count:
        turns = 1 if rng.random() < 0.75 else rng.randint(2, 4)
        messages = []
        while len(messages) < 2 * turns:
            question, answer = _question(rng)
            if question in exclude:
                continue
            exclude.add(question)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        chats.append({"messages": messages})
    return chats


def write_data(cfg: QualityConfig, workdir: Path) -> tuple[list[str], list[str]]:
    """Write the training and validation files (alpaca demo records and generated arithmetic chats, disjoint from
    each other and from the local task's questions); returns (train files, validation files)."""
    from megapack.assets import fetch

    alpaca = json.loads((fetch("llamafactory-data") / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    valid_alpaca = max(1, cfg.num_samples // 4)
    if cfg.num_samples + valid_alpaca > len(alpaca):
        raise MegapackError(f"--num-samples {cfg.num_samples}: expected at most {len(alpaca) * 4 // 5} "
                            f"(alpaca_en_demo has {len(alpaca)} records, a fifth held out)")
    exclude = task_questions()
    valid = arithmetic_chats(cfg.valid_arithmetic, SEED + 1, exclude)
    train = arithmetic_chats(cfg.arithmetic, SEED, exclude)
    out = workdir / "data"
    out.mkdir(parents=True, exist_ok=True)
    files = {"train_arithmetic.jsonl": train, "train_alpaca.jsonl": alpaca[:cfg.num_samples],
             "valid_arithmetic.jsonl": valid,
             "valid_alpaca.jsonl": alpaca[cfg.num_samples:cfg.num_samples + valid_alpaca]}
    for name, rows in files.items():
        (out / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    paths = [str(out / name) for name in files]
    return paths[:2], paths[2:]


def preprocess(cfg: QualityConfig, workdir: Path, hf_dir: Path, train: list[str], valid: list[str]) -> dict[str, dict]:
    """Shards per packing with the model's own chat template, and one validation shard folder (one conversation per
    sequence, so no arm's validation sees another conversation); returns each meta.json by packing (+ "valid")."""
    from megapack.data.pipeline.preprocess import PreprocessConfig, run_preprocess

    jobs = {p: (train, p) for p in cfg.packings} | {"valid": (valid, "padding")}
    metas = {}
    for name, (inputs, packing) in jobs.items():
        pre = PreprocessConfig(
            output_dir=str(workdir / "shards" / name), tokenizer_model=str(hf_dir), inputs=inputs, template="hf",
            seq_length=cfg.seq_length, packing=packing, seed=SEED, workers=1, overwrite=True, progress=False)
        metas[name] = run_preprocess(pre)
    return metas


def train_config(cfg: QualityConfig, workdir: Path, hf_dir: Path, arm: Arm, steps: int, first: bool) -> dict:
    """The run config of one arm: same model, optimizer, seed, sequences per step and validation data; the first
    arm also validates before its first step (the base model's validation loss)."""
    run_dir = workdir / "train" / arm.name
    return {
        "model": {"hf_dir": str(hf_dir), "init": "hf", "cross_sample_attention": arm.cross_sample_attention},
        "data": {"path": str(workdir / "shards" / arm.packing), "valid_path": str(workdir / "shards" / "valid"),
                 "valid_split": "train"},
        "parallel": {"tp": 1, "pp": 1},
        "optimizer": {"lr": cfg.lr, "min_lr": cfg.lr / 10, "warmup_steps": 2, "decay_style": "cosine"},
        "training": {
            "micro_batch_size": 1 if arm.packing != "padding" else 4,
            "global_batch_size": cfg.global_batch_size,
            "epochs": cfg.epochs,
            "eval_interval": max(1, steps // 4),
            "eval_at_start": first,
        },
        "checkpoint": {"dir": None, "export_hf": str(run_dir / "hf")},
        "logging": {"dir": str(run_dir), "tensorboard": False},
    }


def _step0_valid_loss(run_dir: Path) -> float | None:
    """The validation loss a run logged before its first step (training.eval_at_start), if it did."""
    from megapack.training.run.metrics import read_metrics

    path = run_dir / "metrics.jsonl"
    record = read_metrics(path, "valid").get(0) if path.is_file() else None
    return None if record is None else record["valid_loss"]


def evaluate_model(cfg: QualityConfig, model_dir: Path, out_dir: Path) -> dict[str, float]:
    """The local tasks' scores of one HF folder (megapack eval's library function, offline, same settings)."""
    from megapack.evaluation.runner import EvalSettings, evaluate

    limit = float(cfg.eval_limit) if cfg.eval_limit else None
    settings = EvalSettings(tasks=list(TASKS), limit=limit, batch_size=str(cfg.eval_batch_size))
    record = _earlier(out_dir / "eval.json", model_dir, settings)
    if record is None:
        record, _ = evaluate(model_dir, settings, out_dir)
    return {task: record["scores"][task]["value"] for task in TASKS if task in record["scores"]}


def _earlier(path: Path, model_dir: Path, settings) -> dict | None:
    """An eval.json written after the model's weights, of the same model and settings (a rerun skips it)."""
    weights = model_dir / "model.safetensors"
    if not path.is_file() or not weights.is_file() or path.stat().st_mtime < weights.stat().st_mtime:
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    same = record.get("model", {}).get("path") == str(model_dir.resolve()) and all(
        record.get("settings", {}).get(k) == getattr(settings, k) for k in ("tasks", "limit", "batch_size"))
    return record if same else None


@dataclass
class Outcome:
    """What the miniature measured: the base model's scores, each arm's training summary and scores, the phases'
    wall-clock seconds and the machine's load average at the start and the end."""

    base: dict[str, float]
    base_valid_loss: float | None
    summaries: dict[str, dict]
    scores: dict[str, dict[str, float]]
    seconds: dict[str, float]
    load: tuple[float, float]


def _delta(value: float | None, reference: float | None) -> str:
    return "-" if value is None or reference is None else f"{value - reference:+.3f}"


def quality_table(outcome: Outcome) -> str:
    """Table 1 in miniature (markdown): validation loss and each local task's score, before (the base model) and
    after each arm, with the difference from the padding arm as the study reports it."""
    head = ["arm", "valid loss", "Δ vs padding"]
    for task in TASKS:
        head += [task.removeprefix("megapack_"), "Δ vs padding"]
    rows = [["base model (before)", _num(outcome.base_valid_loss, 4), "-"]
            + [x for t in TASKS for x in (_num(outcome.base.get(t)), "-")]]
    ref = outcome.summaries.get("padding", {})
    for name, summary in outcome.summaries.items():
        loss = summary.get("final_valid_loss")
        row = [name, _num(loss, 4), _delta(loss, ref.get("final_valid_loss"))]
        for task in TASKS:
            value = outcome.scores.get(name, {}).get(task)
            row += [_num(value), _delta(value, outcome.scores.get("padding", {}).get(task))]
        rows.append(row)
    return _markdown(head, rows)


def time_table(outcome: Outcome) -> str:
    """Table 3 in miniature (markdown): the existing demo's columns, one row per arm."""
    from megapack.training.run.metrics import TABLE_COLUMNS

    rows = [[name if key == "packing" else ("-" if s.get(key) is None else fmt.format(s[key]))
             for key, _, fmt in TABLE_COLUMNS] for name, s in outcome.summaries.items()]
    return _markdown(["arm" if key == "packing" else title for key, title, _ in TABLE_COLUMNS], rows)


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    cells = ["| " + " | ".join(r) + " |" for r in (head, *rows)]
    return "\n".join([cells[0], "|---|" + "---:|" * (len(head) - 1), *cells[1:]])


def render(cfg: QualityConfig, outcome: Outcome, metas: dict[str, dict], figures: list[dict]) -> str:
    """The miniature's report.md: what ran, the quality table, the time table, the loss curves."""
    s = metas["valid"]["splits"]["train"]
    train = {p: m["splits"]["train"] for p, m in metas.items() if p != "valid"}
    first = next(iter(train.values()))
    total = sum(outcome.seconds.values())
    lines = [
        f"# The study in miniature: {MODELS[cfg.model]}", "",
        f"- data: {first['num_conversations']} training conversations ({cfg.num_samples} alpaca_en_demo records, "
        f"{cfg.arithmetic} generated arithmetic chats), {first['num_tokens']} tokens, seq_length {cfg.seq_length}; "
        f"validation: {s['num_conversations']} held-out conversations ({s['num_tokens']} tokens), one per sequence",
        f"- packs per arm: " + ", ".join(f"{p} {t['num_packs']} ({t['packing_efficiency']:.0%})" for p, t in
                                         train.items()),
        f"- training: {cfg.nproc} CPU processes, fp32, {cfg.global_batch_size} sequences per step, lr {cfg.lr:g} "
        f"cosine, {cfg.epochs:g} epoch; the `{CONTAMINATED}` arm trains bfd's packs with "
        "`model.cross_sample_attention: true`",
        f"- evaluation: megapack eval's local tasks ({', '.join(TASKS)}), "
        f"{'all' if not cfg.eval_limit else f'first {cfg.eval_limit}'} questions each, no chat template",
        f"- measured: {total:.0f} s end to end (" + ", ".join(f"{k} {v:.0f} s" for k, v in outcome.seconds.items())
        + f"); load average {outcome.load[0]:.1f} at the start, {outcome.load[1]:.1f} at the end", "",
        "## Quality (the study's Table 1, in miniature)", "", quality_table(outcome), "",
        "## Time (the study's Table 3, in miniature)", "", time_table(outcome), "",
    ]
    if figures:
        lines += ["## Curves", ""] + [f"![{f['title']}]({f['file']})" for f in figures] + [""]
    return "\n".join(lines)


def run_quality(cfg: QualityConfig) -> Outcome | None:
    """Fetch, generate and preprocess; evaluate the base model; train and evaluate each arm in turn (quality.json and
    report/miniature.md rewritten after each, the figures at the end); returns what was measured."""
    import os

    from megapack.demo_runs import launch, write_run_config
    from megapack.model.gguf_import import fetch_hf_model

    if cfg.model not in MODELS:
        raise MegapackError(f"--model {cfg.model}: expected tiny or one of {', '.join(MODELS)}")
    unknown = [p for p in cfg.packings if p not in PACKINGS]
    if unknown or not cfg.packings:
        raise MegapackError(f"--packings {','.join(cfg.packings)}: expected a comma list of {', '.join(PACKINGS)}")
    load0, clock, seconds = os.getloadavg()[0], time.monotonic(), {}
    workdir = Path(cfg.workdir)
    hf_dir = fetch_hf_model(MODELS[cfg.model])
    train, valid = write_data(cfg, workdir)
    metas = preprocess(cfg, workdir, hf_dir, train, valid)
    seconds["data"] = time.monotonic() - clock
    counts = [metas[name]["splits"]["train"]["num_conversations"] for name in (cfg.packings[0], "valid")]
    print(f"{MODELS[cfg.model]}: {counts[0]} training conversations, {counts[1]} held out", flush=True)
    if not cfg.train:
        return None
    clock = time.monotonic()
    base = evaluate_model(cfg, hf_dir, workdir / "eval" / "base")
    print(f"base model: {base}", flush=True)
    seconds["base eval"] = time.monotonic() - clock
    arms, summaries, scores, base_loss = arms_of(cfg), {}, {}, None
    seconds["training"] = seconds["arm evals"] = 0.0
    for arm in arms:  # one launch per arm: a 135M model's optimizer state per arm would add up in one process
        clock = time.monotonic()
        packs = metas[arm.packing]["splits"]["train"]["num_packs"]
        path = write_run_config(train_config(cfg, workdir, hf_dir, arm,
                                             math.ceil(packs * cfg.epochs / cfg.global_batch_size), arm == arms[0]))
        print(f"training {arm.name} on {cfg.nproc} processes, log {path.parent / 'train.log'}", flush=True)
        summaries[arm.name] = launch([path], cfg.nproc, path.parent / "train.log")[0]
        seconds["training"] += time.monotonic() - clock
        if arm == arms[0]:
            base_loss = _step0_valid_loss(path.parent)
        clock = time.monotonic()
        run_dir = workdir / "train" / arm.name  # its eval/ is where `megapack report` finds Table 1's scores
        scores[arm.name] = evaluate_model(cfg, run_dir / "hf", run_dir / "eval" / "local_tasks")
        print(f"{arm.name}: {scores[arm.name]}", flush=True)
        seconds["arm evals"] += time.monotonic() - clock
        outcome = Outcome(base, base_loss, summaries, scores, seconds, (load0, os.getloadavg()[0]))
        report = write_outcome(cfg, outcome, metas, figures=arm == arms[-1])  # the arms so far, figures at the end
    print("\n" + quality_table(outcome) + "\n\n" + time_table(outcome) + f"\n\nreport: {report}", flush=True)
    return outcome


def write_outcome(cfg: QualityConfig, outcome: Outcome, metas: dict[str, dict], figures: bool) -> Path:
    """Write quality.json and report/miniature.md (with the report's figures when asked and matplotlib is there)."""
    import importlib.util

    from megapack.atomic import write_json_atomic, write_text_atomic

    workdir = Path(cfg.workdir)
    write_json_atomic(workdir / "quality.json", {
        "base": outcome.base, "base_valid_loss": outcome.base_valid_loss, "runs": outcome.summaries,
        "scores": outcome.scores, "seconds": outcome.seconds, "load": list(outcome.load)})
    drawn: list[dict] = []
    if figures and importlib.util.find_spec("matplotlib") is not None:
        from megapack.report.document import write_report

        drawn = write_report([workdir / "train" / name for name in outcome.summaries], workdir / "report",
                             baseline="padding" if "padding" in outcome.summaries else None).figures
    report = workdir / "report" / "miniature.md"
    report.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(report, render(cfg, outcome, metas, drawn))
    return report
