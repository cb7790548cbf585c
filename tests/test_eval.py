"""`megapack eval` (issue 22): its scores on the shipped local tasks equal the `lm_eval` command run directly on
the same folder with the same settings (SmolLM2, real weights); `--suite paper` without cached data fails with one
line per missing task; a megatron checkpoint (a run's checkpoints/ folder) is exported first and its scores land
where `megapack report` reads them; the shipped data files are what tools/make_eval_tasks.py writes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
LOCAL_TASKS = "megapack_arithmetic,megapack_capitals"
LIMIT = "3"


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def megapack_eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`python -m megapack eval ARGS` in its own process (the offline switches set before anything imports)."""
    return subprocess.run([sys.executable, "-m", "megapack", "eval", *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smol_eval(smollm2_dir, tmp_path_factory) -> tuple[dict, dict]:
    """megapack eval and `python -m lm_eval` on SmolLM2 and the two shipped tasks, same settings: their results."""
    from megapack.evaluation.suites import write_local_tasks

    work = tmp_path_factory.mktemp("smol_eval")
    proc = megapack_eval(str(smollm2_dir), "--tasks", LOCAL_TASKS, "--limit", LIMIT, "--out", str(work / "mp"),
                         cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((work / "mp" / "eval.json").read_text())
    include = write_local_tasks(work / "tasks")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={smollm2_dir},dtype=float32", "--device", "cpu", "--include_path", str(include), "--tasks",
           LOCAL_TASKS, "--limit", LIMIT, "--batch_size", "1", "--output_path", str(work / "direct")]
    direct = subprocess.run(cmd, cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stderr[-3000:]
    (theirs_file,) = (work / "direct").rglob("results_*.json")
    return ours, json.loads(theirs_file.read_text())


@pytest.mark.slow
def test_eval_equals_lm_eval_run_directly(smol_eval):
    ours, theirs = smol_eval
    assert set(ours["lm_eval"]["results"]) == set(theirs["results"]) == set(LOCAL_TASKS.split(","))
    for task, metrics in theirs["results"].items():
        assert ours["lm_eval"]["results"][task] == metrics, task  # every metric (and stderr) equal
    assert ours["lm_eval"]["n-shot"] == theirs["n-shot"] == {"megapack_arithmetic": 3, "megapack_capitals": 0}
    for task, config in theirs["configs"].items():  # the task configs too, but for metadata (model args, paths)
        assert {k: v for k, v in ours["lm_eval"]["configs"][task].items() if k != "metadata"} == \
            {k: v for k, v in config.items() if k != "metadata"}, task
    # non-trivial scores: a real model answers some, not all (a random one scores ~0 and ~0.25)
    arithmetic = ours["scores"]["megapack_arithmetic"]
    assert arithmetic["metric"] == "exact_match,get-answer" and 0 < arithmetic["value"]
    assert ours["scores"]["megapack_capitals"]["value"] > 0.25
    assert ours["settings"]["apply_chat_template"] is False and ours["settings"]["limit"] == int(LIMIT)
    assert {"megapack", "lm_eval", "transformers", "torch"} <= set(ours["versions"])
    assert ours["model"]["kind"] == "hf" and ours["tasks"] == LOCAL_TASKS.split(",")


@pytest.mark.slow
def test_paper_suite_without_cached_data_is_one_line_per_task(smollm2_dir, tmp_path):
    hf_home = tmp_path / "hf_home"  # an empty cache, wherever this machine keeps its own
    proc = subprocess.run([sys.executable, "-m", "megapack", "eval", str(smollm2_dir), "--suite", "paper"],
                          cwd=tmp_path, env={**_env(), "HF_HOME": str(hf_home)}, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    names = ["mmlu", "gsm8k", "minerva_math", "bbh_cot_fewshot", "ifeval", "humaneval"]
    assert [":".join(ln.split(":")[:2]) for ln in lines] == [f"error: task {n}" for n in names], lines
    assert "dataset cais/mmlu (57 configs) not cached" in lines[0]
    assert "datasets.load_dataset('openai/gsm8k', 'main')" in lines[1]
    assert "evaluate.load('code_eval')" in lines[5]
    assert not (tmp_path / "eval").exists()


def test_shipped_task_data_is_what_the_tool_writes(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_eval_tasks
    finally:
        sys.path.remove(str(ROOT / "tools"))
    for path in make_eval_tasks.write_all(tmp_path):
        assert path.read_bytes() == (ROOT / "megapack/evaluation/tasks" / path.name).read_bytes(), path.name
    arithmetic = [json.loads(x) for x in (tmp_path / "arithmetic_test.jsonl").read_text().splitlines()]
    assert len(arithmetic) == 100 and all(str(eval(r["question"][8:-1])) == r["answer"] for r in arithmetic)
    capitals = [json.loads(x) for x in (tmp_path / "capitals_test.jsonl").read_text().splitlines()]
    assert capitals[0]["choices"][capitals[0]["answer"]] == "Paris"


@pytest.mark.slow
def test_megatron_run_checkpoint_is_exported_and_lands_in_the_run(smollm2_dir, smol_eval, tmp_path):
    """A run's checkpoints/ folder (its `latest`): exported through `convert megatron-to-hf`, scored as the HF
    folder it came from (the fp32 round trip is exact), eval.json written into the run's eval/ for the report."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "megapack", "convert", "hf-to-megatron", "--hf-dir",
                           str(smollm2_dir), "--output-dir", str(run_dir / "iter_0000003")], env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "latest").write_text("iter_0000003")
    (run_dir / "summary.json").write_text("{}")
    proc = megapack_eval(str(run_dir), "--tasks", LOCAL_TASKS, "--limit", LIMIT, "--out", str(tmp_path / "out"),
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((tmp_path / "out" / "eval.json").read_text())
    in_run = json.loads((run_dir / "eval" / "megapack_arithmetic+megapack_capitals" / "eval.json").read_text())
    assert in_run == ours
    assert ours["model"]["kind"] == "megatron" and ours["model"]["iteration"] == 3
    assert ours["model"]["run_dir"] == str(run_dir.resolve())
    assert ours["lm_eval"]["results"] == smol_eval[0]["lm_eval"]["results"]


@pytest.mark.slow
def test_report_shows_table_1_with_baseline_deltas(smollm2_dir, smol_eval, tmp_path):
    """Two runs with real eval.json files (the fixture's, and one more at another --limit): `megapack report
    --baseline` shows each run's headline scores in % and the other run's difference in points."""
    from megapack.errors import MegapackError
    from megapack.report.document import write_report

    runs = tmp_path / "runs"
    second = tmp_path / "second"
    proc = megapack_eval(str(smollm2_dir), "--tasks", "megapack_capitals", "--limit", "8", "--out", str(second),
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {"padding": smol_eval[0], "bfd": json.loads((second / "eval.json").read_text())}
    for name, record in records.items():
        (runs / name / "eval" / "x").mkdir(parents=True)
        (runs / name / "eval" / "x" / "eval.json").write_text(json.dumps(record))
        (runs / name / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "loss": 1.0}) + "\n")
        (runs / name / "summary.json").write_text(json.dumps({"packing": name}))
    text = write_report([runs], tmp_path / "report", baseline="padding").path.read_text()
    base = records["padding"]["scores"]
    cap = records["bfd"]["scores"]["megapack_capitals"]["value"]
    delta = 100 * (cap - base["megapack_capitals"]["value"])
    assert "| run | megapack_arithmetic (3-shot, exact_match) | megapack_capitals (0-shot, acc) |" in text
    assert (f"| padding (baseline) | {100 * base['megapack_arithmetic']['value']:.1f} | "
            f"{100 * base['megapack_capitals']['value']:.1f} |") in text
    assert f"| bfd | - | {100 * cap:.1f} ({delta:+.1f}) |" in text
    with pytest.raises(MegapackError, match="--baseline nosuch: not one of the runs"):
        write_report([runs], tmp_path / "report", baseline="nosuch")
