"""Tokenizers behind one small interface (`tokenizer_base.Tokenizer`): LLaMA-3 (tiktoken BPE ranks file),
SentencePiece (LLaMA-2 / Mistral) and Hugging Face `tokenizer.json` (the `tokenizers` library; see
`tokenizer_json`); `load_tokenizer` picks one from the file's content.

Their `identity` is `vocab.vocab_identity` of the file, and goes into shard metadata.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from megapack.data.render.tokenizer_base import (
    LLAMA3_NAMED_SPECIALS, LLAMA3_NUM_RANKS, LLAMA3_NUM_SPECIAL, LLAMA3_PATTERN, Tokenizer, parse_ranks,
    read_model_file, reload_tokenizer, sniff_kind,
)
from megapack.data.render.tokenizer_json import TokenizerJsonTokenizer
from megapack.data.render.vocab import cached_identity, sentencepiece_identity, tiktoken_identity
from megapack.errors import MegapackError


class TiktokenLlama3Tokenizer(Tokenizer):
    """The LLaMA-3 tokenizer: tiktoken BPE over 128,000 ranks plus 256 special tokens from id 128000."""

    def __init__(self, path: Path, data: bytes | None = None):
        import tiktoken

        self.path = Path(path)
        data = read_model_file(self.path) if data is None else data
        ranks = parse_ranks(self.path, data)
        if len(ranks) != LLAMA3_NUM_RANKS:
            raise MegapackError(f"{self.path}: {len(ranks)} BPE ranks, expected {LLAMA3_NUM_RANKS} for LLaMA-3")
        n_reserved = LLAMA3_NUM_SPECIAL - len(LLAMA3_NAMED_SPECIALS)
        names = list(LLAMA3_NAMED_SPECIALS) + [f"<|reserved_special_token_{2 + k}|>" for k in range(n_reserved)]
        self.special_tokens = {name: LLAMA3_NUM_RANKS + i for i, name in enumerate(names)}
        self._enc = tiktoken.Encoding(
            name=f"megapack-llama3-{self.path.name}", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.vocab_size = LLAMA3_NUM_RANKS + LLAMA3_NUM_SPECIAL
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.kind, self.file_sha256 = "tiktoken-llama3", hashlib.sha256(data).hexdigest()
        self.identity = cached_identity(self.file_sha256, lambda: tiktoken_identity(ranks))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, special-token strings encoded as ordinary text."""
        return self._enc.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (tiktoken's threaded batch path)."""
        return self._enc.encode_ordinary_batch(list(texts))

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; invalid UTF-8 byte sequences become U+FFFD."""
        return self._enc.decode([int(i) for i in ids], errors="replace")

    def __reduce__(self):
        return (reload_tokenizer, (type(self), str(self.path), self.file_sha256))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA-2, Mistral): BOS/EOS/PAD ids come from the model itself."""

    def __init__(self, path: Path, data: bytes | None = None):
        import sentencepiece

        self.path = Path(path)
        data = read_model_file(self.path) if data is None else data
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(data)
        except (RuntimeError, OSError) as exc:
            raise MegapackError(f"{self.path}: not a readable SentencePiece model ({exc})") from None
        sp = self._sp
        self.vocab_size = sp.get_piece_size()
        if sp.bos_id() < 0 or sp.eos_id() < 0:
            raise MegapackError(f"{self.path}: SentencePiece model defines no BOS/EOS pieces (bos_id/eos_id = -1)")
        self.bos_id, self.eos_id = sp.bos_id(), sp.eos_id()
        # LLaMA-2 and Mistral models define no pad piece; padding is never a loss target, so EOS serves.
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else self.eos_id
        self.special_tokens = {
            sp.id_to_piece(i): i for i in range(self.vocab_size)
            if sp.is_control(i) or sp.is_unknown(i)
        }
        self.kind, self.file_sha256 = "sentencepiece", hashlib.sha256(data).hexdigest()
        self.identity = cached_identity(self.file_sha256, lambda: sentencepiece_identity(sp))

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, "<s>" in the text is encoded as ordinary text."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once."""
        return self._sp.encode(list(texts), out_type=int)

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (control tokens such as BOS/EOS decode to nothing, as in SentencePiece)."""
        return self._sp.decode([int(i) for i in ids])

    def __reduce__(self):
        return (reload_tokenizer, (type(self), str(self.path), self.file_sha256))


TOKENIZER_KINDS = ("auto", "tiktoken", "sentencepiece", "tokenizer-json")  # auto: detected from the file's content


def load_tokenizer(path: str | Path, kind: str = "auto") -> Tokenizer:
    """Load a tokenizer from a model file or a checkpoint directory; kind is one of TOKENIZER_KINDS."""
    path = _resolve(Path(path))
    data = read_model_file(path)
    if kind == "auto":
        kind = sniff_kind(path, data)
    if kind == "tiktoken":
        return TiktokenLlama3Tokenizer(path, data)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, data)
    if kind == "tokenizer-json":
        return TokenizerJsonTokenizer(path, data)
    raise MegapackError(f"unknown tokenizer kind {kind!r}; expected one of {', '.join(TOKENIZER_KINDS)}")


def _resolve(path: Path) -> Path:
    """A model file, or inside a checkpoint directory `original/tokenizer.model`, `tokenizer.model` or
    `tokenizer.json`."""
    if path.is_dir():
        for candidate in (path / "original" / "tokenizer.model", path / "tokenizer.model", path / "tokenizer.json"):
            if candidate.is_file():
                return candidate
        raise MegapackError(f"{path}: directory holds none of original/tokenizer.model, tokenizer.model, "
                            f"tokenizer.json")
    if not path.exists():
        raise MegapackError(f"{path}: tokenizer file not found (expected a tiktoken ranks file, a SentencePiece "
                            f"model, a tokenizer.json, or a checkpoint directory with one of them)")
    return path
