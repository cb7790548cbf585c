"""Token generation with a megatron GPTModel at TP1/PP1: greedy or sampled decoding over a KV cache.

The cache is megatron-core's own static one: a `StaticInferenceContext` passed to `GPTModel.forward`. Each
`Attention` layer then writes the new keys/values into its buffers and hands the core attention every cached key
(`Attention._adjust_key_value_for_inference`), RoPE sliced to the new positions. megapack's core attention
(`sdpa` backend, sbhd without packed_seq_params) masks causally aligned to the END of the keys, so a prefill, a one
token decode step and a later chunk (the next turn of a chat) are all exact. `use_cache=False` recomputes the whole
sequence for every token (the reference the cache is tested against).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from megapack.errors import MegapackError
from megapack.seeds import check_seed


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (temperature 0) or sampled with temperature and nucleus (top-p)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise MegapackError(f"--temperature {self.temperature}: expected a number >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise MegapackError(f"--top-p {self.top_p}: expected a number in (0, 1]")
        check_seed(self.seed, "--seed")


@dataclass
class Generation:
    """What one call produced: the new token ids, why it stopped, and how long the prefill and decode took."""

    tokens: list[int]
    stopped: str  # "stop_token" (the last token is a stop id), "stop_text", "max_new_tokens" or "max_length"
    prompt_tokens: int  # tokens run through the model before the first new one (only the uncached part)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    timings: list[float] = field(default_factory=list)


def pick_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token id from one position's logits `[vocab]` (greedy argmax, or a temperature/top-p sample)."""
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= sampling.top_p] = 0.0  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


class Decoder:
    """A model plus its KV cache: `generate` continues from the tokens already cached when they are a prefix."""

    def __init__(self, model, max_length: int, use_cache: bool = True) -> None:
        self.model = model
        self.max_length = max_length
        self.use_cache = use_cache
        self.device = next(model.parameters()).device
        self.context = None
        self.cached: list[int] = []  # the tokens whose keys/values the cache holds, in order

    def _new_context(self, length: int) -> None:
        from megatron.core.inference.contexts import StaticInferenceContext

        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=length)
        self.cached = []

    def _forward(self, ids: Sequence[int], context) -> torch.Tensor:
        """Logits `[vocab]` of the last of `ids`, which start at position len(self.cached) (0 without context)."""
        start = context.sequence_len_offset if context is not None else 0
        tokens = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        with torch.no_grad():
            logits = self.model(tokens, positions, None, inference_context=context)
        if context is not None:
            context.sequence_len_offset += len(ids)
        return logits[0, -1].float()

    def _prefill(self, ids: list[int], budget: int) -> tuple[torch.Tensor, int]:
        """Logits after `ids`, running only the part past the cached prefix (a new cache when it is not a prefix)."""
        if not self.use_cache:
            return self._forward(ids, None), len(ids)
        need = min(self.max_length, len(ids) + budget)
        reuse = self.context is not None and len(self.cached) < len(ids) \
            and ids[:len(self.cached)] == self.cached and need <= self.context.max_sequence_length
        if not reuse:  # a new conversation, or one longer than the buffers: room to grow, then prefill it all
            grown = 2 * self.context.max_sequence_length if self.context is not None else 0
            self._new_context(min(self.max_length, max(2 * need, grown)))
        new = ids[len(self.cached):]
        logits = self._forward(new, self.context)
        self.cached = list(ids)
        return logits, len(new)

    def generate(self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = (),
                 sampling: Sampling = Sampling(), on_token: Callable[[list[int]], bool] | None = None) -> Generation:
        """New tokens after `prompt` until a stop id (kept as the last token), `on_token(tokens so far)` returning
        True, max_new_tokens or max_length."""
        ids, stops = [int(t) for t in prompt], {int(t) for t in stop_ids}
        if not ids:
            raise MegapackError("generate: the prompt renders to no tokens")
        if len(ids) >= self.max_length:
            raise MegapackError(f"generate: the prompt holds {len(ids)} tokens, the model's limit is {self.max_length} "
                                f"(max_position_embeddings); shorten the conversation")
        if max_new_tokens < 1:
            raise MegapackError(f"--max-new-tokens {max_new_tokens}: expected at least 1")
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(sampling.seed % 2**63)
        t0 = time.perf_counter()
        logits, ran = self._prefill(ids, max_new_tokens)
        out = Generation(tokens=[], stopped="max_new_tokens", prompt_tokens=ran, prefill_s=time.perf_counter() - t0)
        t1 = time.perf_counter()
        while True:
            token = pick_next(logits, sampling, generator)
            out.tokens.append(token)
            out.timings.append(time.perf_counter() - t1)
            if token in stops:
                out.stopped = "stop_token"
                break
            if on_token is not None and on_token(out.tokens):
                out.stopped = "stop_text"
                break
            if len(out.tokens) >= max_new_tokens:
                break
            if len(ids) + len(out.tokens) >= self.max_length:
                out.stopped = "max_length"
                break
            if self.use_cache:
                logits = self._forward([token], self.context)
                self.cached.append(token)
            else:
                logits = self._forward(ids + out.tokens, None)
        out.decode_s = time.perf_counter() - t1
        return out
