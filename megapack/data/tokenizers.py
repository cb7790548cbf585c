"""Tokenizers behind one small interface: LLaMA-3 (tiktoken BPE ranks file) and SentencePiece (LLaMA-2 / Mistral).

`encode` never adds BOS/EOS and treats special-token strings in the text ("<|eot_id|>", "<s>") as plain text, so
user data cannot inject control tokens; chat templates emit special tokens by id. Tokenizers pickle by file path
(workers reload the file), and their `identity` (kind + sha256 of the file) goes into shard metadata.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import re
from abc import ABC, abstractmethod
from pathlib import Path

from megapack.errors import MegapackError

# The pre-tokenizer split pattern of LLaMA-3 (contractions, letter runs with one leading non-letter, digit groups of
# at most 3, punctuation runs with trailing newlines, newline runs, whitespace).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_RANKS = 128_000
LLAMA3_NUM_SPECIAL = 256
# Named special tokens in id order from 128000, as in Meta's llama-models (the package that ships the ranks file);
# the remaining ids are "<|reserved_special_token_{k}|>" with k counting on from 2.
LLAMA3_NAMED_SPECIALS = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
    "<|eot_id|>", "<|python_tag|>", "<|image|>",
)

_RANKS_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2} \d+$")


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer."""

    vocab_size: int  # including special tokens
    bos_id: int
    eos_id: int
    pad_id: int
    identity: str  # "<kind>:<sha256 of the model file, 16 hex digits>"
    special_tokens: dict[str, int]
    path: Path

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, special-token strings encoded as ordinary text."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens rendered by name)."""

    def token_id(self, special: str) -> int:
        """Id of a special token given by name, e.g. "<|eot_id|>"."""
        try:
            return self.special_tokens[special]
        except KeyError:
            raise MegapackError(f"tokenizer {self.identity} ({self.path}) has no special token {special!r}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, identity={self.identity!r})"


class TiktokenLlama3Tokenizer(Tokenizer):
    """The LLaMA-3 tokenizer: tiktoken BPE over 128,000 ranks plus 256 special tokens from id 128000."""

    def __init__(self, path: Path, data: bytes | None = None):
        import tiktoken

        self.path = Path(path)
        data = _read(self.path) if data is None else data
        ranks = _parse_ranks(self.path, data)
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
        self.identity = f"tiktoken-llama3:{hashlib.sha256(data).hexdigest()[:16]}"

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
        return (_reload, (type(self), str(self.path), self.identity))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (LLaMA-2, Mistral): BOS/EOS/PAD ids come from the model itself."""

    def __init__(self, path: Path, data: bytes | None = None):
        import sentencepiece

        self.path = Path(path)
        data = _read(self.path) if data is None else data
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
        self.identity = f"sentencepiece:{hashlib.sha256(data).hexdigest()[:16]}"

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
        return (_reload, (type(self), str(self.path), self.identity))


def load_tokenizer(path: str | Path, kind: str = "auto") -> Tokenizer:
    """Load a tokenizer from a model file or a checkpoint directory; kind is "auto", "tiktoken" or "sentencepiece"."""
    path = _resolve(Path(path))
    data = _read(path)
    if kind == "auto":
        kind = _sniff(path, data)
    if kind == "tiktoken":
        return TiktokenLlama3Tokenizer(path, data)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, data)
    raise MegapackError(f"unknown tokenizer kind {kind!r}; expected auto, tiktoken or sentencepiece")


def _resolve(path: Path) -> Path:
    """A model file, or inside a checkpoint directory `original/tokenizer.model` or `tokenizer.model`."""
    if path.is_dir():
        for candidate in (path / "original" / "tokenizer.model", path / "tokenizer.model"):
            if candidate.is_file():
                return candidate
        raise MegapackError(f"{path}: directory holds neither original/tokenizer.model nor tokenizer.model")
    if not path.exists():
        raise MegapackError(f"{path}: tokenizer file not found (expected a tiktoken ranks file, a SentencePiece "
                            f"model, or a checkpoint directory with original/tokenizer.model)")
    return path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MegapackError(f"{path}: cannot read tokenizer file ({exc.strerror or exc})") from None


def _sniff(path: Path, data: bytes) -> str:
    """tiktoken ranks files are text lines "base64 rank"; SentencePiece models are protobuf (field 1 first)."""
    first = data.split(b"\n", 1)[0]
    if _RANKS_LINE.match(first):
        return "tiktoken"
    if data[:1] == b"\x0a":
        return "sentencepiece"
    raise MegapackError(f"{path}: neither a tiktoken ranks file (lines 'base64 rank') nor a SentencePiece model")


def _parse_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise MegapackError(f"{path}:{lineno}: expected 'base64-token rank', got {line[:60]!r}") from None
    return ranks


def _reload(cls: type[Tokenizer], path: str, identity: str) -> Tokenizer:
    tok = cls(Path(path))
    if tok.identity != identity:
        raise MegapackError(f"{path}: tokenizer file changed since it was loaded ({identity} -> {tok.identity})")
    return tok
