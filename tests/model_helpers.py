"""Shared helpers for the model tests: tiny random HF LLaMA checkpoints, HF reference logits, gloo worker jobs."""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

TINY = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2)


def tiny_hf_config(tied: bool = False, num_layers: int = 4, vocab_size: int = 300) -> dict:
    """HF config.json dict: GQA, rope_theta 500000, llama3 rope_scaling with a short original length."""
    from megapack.model.tiny_checkpoint import tiny_llama_config

    config = tiny_llama_config(
        vocab_size=vocab_size, hidden_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2,
        intermediate_size=128, tie_word_embeddings=tied, max_position_embeddings=256,
    )
    # a short original context so the llama3 scaling changes low, medium and high frequencies at head_dim 16
    config["rope_scaling"] |= {"factor": 8.0, "original_max_position_embeddings": 64}
    config["bos_token_id"], config["eos_token_id"] = 1, 2
    return config


def make_hf_checkpoint(output_dir: str | Path, tied: bool = False, seed: int = 0, num_layers: int = 4) -> Path:
    """Save a random transformers LlamaForCausalLM (norms randomised too) as safetensors; returns its directory."""
    import transformers

    config = transformers.LlamaConfig(**tiny_hf_config(tied, num_layers))
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.05)
    model.save_pretrained(output_dir, safe_serialization=True)
    return Path(output_dir)


def hf_logits(hf_dir: str | Path, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 logits of transformers' LlamaForCausalLM for input_ids [b, t]."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=input_ids, position_ids=position_ids).logits


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, fn: Callable, kwargs: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        queue.put((rank, "ok", fn(**kwargs)))
    except BaseException:  # report any failure to the parent instead of hanging it
        queue.put((rank, "error", traceback.format_exc()))


def run_workers(fn: Callable, world_size: int, timeout_s: float = 300, **kwargs: Any) -> list:
    """Run fn(**kwargs) in world_size spawned processes wired for torch.distributed; returns results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, kwargs, queue)) for r in range(world_size)]
    for proc in procs:
        proc.start()
    results: dict[int, Any] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, status, value = queue.get(timeout=timeout_s)
            if status == "error":
                errors.append(f"rank {rank}:\n{value}")
                break
            results[rank] = value
    finally:
        for proc in procs:
            proc.join(timeout=5 if errors else 30)
            if proc.is_alive():
                proc.terminate()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]


def packed_example(seed: int = 0, lengths: tuple[int, ...] = (7, 12, 9), vocab: int = 300):
    """Three conversations (token id lists) and their pack: tokens [1, t], position_ids [1, t], cu_seqlens int32."""
    gen = torch.Generator().manual_seed(seed)
    convs = [torch.randint(3, vocab, (n,), generator=gen) for n in lengths]
    tokens = torch.cat(convs)[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return convs, tokens, positions, cu
