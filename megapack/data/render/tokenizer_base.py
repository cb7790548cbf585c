"""The tokenizer interface and what its backends share: reading and sniffing a model file, LLaMA-3's constants,
and reloading by path (tokenizers pickle by file path; workers reload the file and check its sha256).

`encode` never adds BOS/EOS and treats special-token strings in the text ("<|eot_id|>", "<s>") as plain text, so
user data cannot inject control tokens; chat templates emit special tokens by id.
"""
from __future__ import annotations

import base64
import binascii
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
    identity: str  # vocab_identity of the file: "vocab:<64 hex>"
    kind: str  # "tiktoken-llama3", "sentencepiece" or "tokenizer-json"
    file_sha256: str  # of the model file; workers reloading it check that it is unchanged
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
            raise MegapackError(f"tokenizer {self.kind} ({self.path}) has no special token {special!r}") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, identity={self.identity!r})"


def read_model_file(path: Path) -> bytes:
    """The bytes of a tokenizer model file (MegapackError when unreadable)."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MegapackError(f"{path}: cannot read tokenizer file ({exc.strerror or exc})") from None


def sniff_kind(path: Path, data: bytes) -> str:
    """tiktoken ranks files are text lines "base64 rank"; SentencePiece models are protobuf (field 1 first);
    tokenizer.json is a JSON object."""
    first = data.split(b"\n", 1)[0]
    if _RANKS_LINE.match(first):
        return "tiktoken"
    if data[:1] == b"\x0a":
        return "sentencepiece"
    if data.lstrip()[:1] == b"{":
        return "tokenizer-json"
    raise MegapackError(f"{path}: neither a tiktoken ranks file (lines 'base64 rank'), a SentencePiece model nor a "
                        f"tokenizer.json")


def parse_ranks(path: Path, data: bytes) -> dict[bytes, int]:
    """A tiktoken ranks file as {token bytes: rank}."""
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


def reload_tokenizer(cls: type[Tokenizer], path: str, file_sha256: str) -> Tokenizer:
    """Load `cls` from `path` again (unpickling), refusing a file whose content changed."""
    tok = cls(Path(path))
    if tok.file_sha256 != file_sha256:
        raise MegapackError(f"{path}: tokenizer file changed since it was loaded "
                            f"(sha256 {file_sha256[:16]} -> {tok.file_sha256[:16]})")
    return tok
