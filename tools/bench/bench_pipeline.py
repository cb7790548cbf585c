"""Pipeline benchmark: tokens/s and peak RSS (all processes) of `megapack preprocess --workers 2` on generated text
documents and generated conversations, at two input sizes (to show memory is flat). Prints a table (not a test).

Texts are drawn from the words of LLaMA-Factory's demo data (real English), with lognormal lengths.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil


def word_pool() -> np.ndarray:
    """Words of the fetched LLaMA-Factory demo files."""
    from megapack.assets import fetch

    data = fetch("llamafactory-data")
    words: list[str] = []
    for rec in json.loads((data / "alpaca_en_demo.json").read_text()):
        words += (rec["instruction"] + " " + rec["input"] + " " + rec["output"]).split()
    return np.array(words)


def generate(path: Path, kind: str, n: int, seed: int = 0) -> None:
    """n text documents ({"text"}) or ShareGPT conversations, ~lognormal(ln 500 words, 0.8) words each."""
    rng = np.random.default_rng(seed)
    pool = word_pool()
    with open(path, "w") as f:
        for _ in range(n):
            k = int(np.clip(np.exp(rng.normal(np.log(500), 0.8)), 5, 8000))
            text = " ".join(pool[rng.integers(0, len(pool), k)])
            if kind == "text":
                rec = {"text": text}
            else:
                cut = max(1, k // 4)
                words = text.split(" ")
                rec = {"conversations": [{"from": "human", "value": " ".join(words[:cut])},
                                         {"from": "gpt", "value": " ".join(words[cut:]) or "ok"}]}
            f.write(json.dumps(rec) + "\n")


def measure(cmd: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak summed RSS of the process tree, stdout."""
    proc = psutil.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = time.perf_counter()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - t
    done.set()
    thread.join()
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}")
    return wall, peak, out


def tiktoken_alone(path: Path, tokenizer_path: Path, n: int = 2000) -> float:
    """Tokens/s of the bare tokenizer in this one process on the first n samples' texts (the per-core ceiling)."""
    from megapack.data.render.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer_path)
    texts = []
    with open(path) as f:
        for line, _ in zip(f, range(n)):
            rec = json.loads(line)
            texts += [rec["text"]] if "text" in rec else [t["value"] for t in rec["conversations"]]
    t = time.perf_counter()
    total = sum(len(tok.encode(x)) for x in texts)
    return total / (time.perf_counter() - t)


def main() -> None:
    """Generate inputs, run preprocess on each, print a table."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100_000, help="documents / conversations in the larger input")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seq-length", type=int, default=4096)
    args = p.parse_args()
    from megapack.assets import fetch

    tok = fetch("llama3-tokenizer")
    print("| input | samples | tokens | wall (s) | tokens/s | tiktoken alone, 1 core | peak RSS (all processes) | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, template in (("text", "plain"), ("conversations", "llama3")):
            full = Path(tmp) / f"{kind}-{args.n}.jsonl"
            generate(full, kind, args.n)
            half = Path(tmp) / f"{kind}-{args.n // 2}.jsonl"
            with open(full) as src, open(half, "w") as dst:
                dst.writelines(line for line, _ in zip(src, range(args.n // 2)))
            for n, data in ((args.n // 2, half), (args.n, full)):
                out = Path(tmp) / f"out-{kind}-{n}"
                ceiling = tiktoken_alone(data, tok)
                load = os.getloadavg()[0]
                wall, peak, _ = measure([
                    sys.executable, "-m", "megapack", "preprocess", "--input", str(data), "--template", template,
                    "--tokenizer-model", str(tok), "--seq-length", str(args.seq_length), "--workers",
                    str(args.workers), "--output-dir", str(out), "--no-progress",
                ])
                meta = json.loads((out / "meta.json").read_text())
                tokens = meta["num_tokens"] + meta["truncated_tokens"]
                print(f"| {kind} | {n:,} | {tokens:,} | {wall:.1f} | {tokens / wall / 1e6:.2f} M | {ceiling / 1e6:.2f} M | "
                      f"{peak / 2**20:,.0f} MiB | {load:.1f} |", flush=True)
                shutil.rmtree(out)
            full.unlink()
            half.unlink()


if __name__ == "__main__":
    main()
