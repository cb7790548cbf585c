"""Tokenizers behind one small interface: LLaMA-3 (tiktoken BPE ranks file), SentencePiece (LLaMA-2 / Mistral) and
Hugging Face `tokenizer.json` (the `tokenizers` library; see `tokenizer_json`).

`encode` never adds BOS/EOS and treats special-token strings in the text ("<|eot_id|>", "<s>") as plain text, so
user data cannot inject control tokens; chat templates emit special tokens by id. Tokenizers pickle by file path
(workers reload the file and check its sha256), and their `identity` goes into shard metadata.

`identity` is `vocab_identity`: "vocab:<sha256>" of the vocabulary's content (token bytes by id, special token ids),
independent of the file format, so a tiktoken ranks file and the `tokenizer.json` of the same LLaMA-3 vocabulary,
or a SentencePiece model and its SP-style `tokenizer.json`, compare equal.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
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
        self.kind, self.file_sha256 = "tiktoken-llama3", hashlib.sha256(data).hexdigest()
        self.identity = _cached_identity(self.file_sha256, lambda: _tiktoken_identity(ranks))

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
        return (_reload, (type(self), str(self.path), self.file_sha256))


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
        self.kind, self.file_sha256 = "sentencepiece", hashlib.sha256(data).hexdigest()
        self.identity = _cached_identity(self.file_sha256, lambda: _sentencepiece_identity(sp))

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
        return (_reload, (type(self), str(self.path), self.file_sha256))


TOKENIZER_KINDS = ("auto", "tiktoken", "sentencepiece", "tokenizer-json")  # auto: detected from the file's content


def load_tokenizer(path: str | Path, kind: str = "auto") -> Tokenizer:
    """Load a tokenizer from a model file or a checkpoint directory; kind is one of TOKENIZER_KINDS."""
    path = _resolve(Path(path))
    data = _read(path)
    if kind == "auto":
        kind = _sniff(path, data)
    if kind == "tiktoken":
        return TiktokenLlama3Tokenizer(path, data)
    if kind == "sentencepiece":
        return SentencePieceTokenizer(path, data)
    if kind == "tokenizer-json":
        from megapack.data.render.tokenizer_json import TokenizerJsonTokenizer

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


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MegapackError(f"{path}: cannot read tokenizer file ({exc.strerror or exc})") from None


def _sniff(path: Path, data: bytes) -> str:
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


def _reload(cls: type[Tokenizer], path: str, file_sha256: str) -> Tokenizer:
    tok = cls(Path(path))
    if tok.file_sha256 != file_sha256:
        raise MegapackError(f"{path}: tokenizer file changed since it was loaded "
                            f"(sha256 {file_sha256[:16]} -> {tok.file_sha256[:16]})")
    return tok


# ---- vocabulary identity ---------------------------------------------------------------------------------------------

_IDENTITIES: dict[str, str | None] = {}  # sha256 of a file -> its vocab_identity (computing one takes ~0.1-0.4 s)


def vocab_identity(path: str | Path, data: bytes | None = None) -> str | None:
    """'vocab:<64 hex>' of a tiktoken ranks file, SentencePiece model or tokenizer.json; None for other formats."""
    data = _read(Path(path)) if data is None else data
    return _cached_identity(hashlib.sha256(data).hexdigest(), lambda: _identity_of(Path(path), data))


def _cached_identity(file_sha256: str, compute: Callable[[], str | None]) -> str | None:
    if file_sha256 not in _IDENTITIES:
        _IDENTITIES[file_sha256] = compute()
    return _IDENTITIES[file_sha256]


def _digest(tokens: dict[int, bytes], specials: Iterable[int]) -> str:
    """The canonical hash: ordinary tokens as (id, length, bytes) in id order, then the special token ids.

    Special token *names* are left out on purpose: a tiktoken ranks file carries none (megapack names them as Meta's
    llama-models 0.3.0 does), and LLaMA-3.0's tokenizer.json names the same ids differently (128004 is
    "<|reserved_special_token_2|>" there, "<|finetune_right_pad_id|>" in LLaMA-3.1) for the same vocabulary.
    """
    parts = [b"megapack-vocab-1\n"]
    for i in sorted(tokens):
        parts += [struct.pack("<II", i, len(tokens[i])), tokens[i]]
    specials = sorted(set(specials))
    parts += [b"\nspecial\n", struct.pack(f"<{len(specials)}I", *specials)]
    return "vocab:" + hashlib.sha256(b"".join(parts)).hexdigest()


def _tiktoken_identity(ranks: dict[bytes, int]) -> str | None:
    if len(ranks) != LLAMA3_NUM_RANKS:  # megapack reads tiktoken files as LLaMA-3 only
        return None
    return _digest({rank: token for token, rank in ranks.items()},
                   range(LLAMA3_NUM_RANKS, LLAMA3_NUM_RANKS + LLAMA3_NUM_SPECIAL))


def _sentencepiece_identity(sp) -> str:
    """Pieces by id as UTF-8 (with "▁"); control and unknown pieces are the specials. Scores and types are ignored."""
    n = sp.get_piece_size()
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    skip = set(specials)
    return _digest({i: sp.id_to_piece(i).encode("utf-8") for i in range(n) if i not in skip}, specials)


def _identity_of(path: Path, data: bytes) -> str | None:
    if data.lstrip()[:1] == b"{":
        return _tokenizer_json_identity(data)
    try:
        kind = _sniff(path, data)
        if kind == "tiktoken":
            return _tiktoken_identity(_parse_ranks(path, data))
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        return _sentencepiece_identity(sp)
    except (MegapackError, RuntimeError, OSError):
        return None


def _byte_decoder() -> dict[int, str]:
    """GPT-2's bytes_to_unicode inverted, as a str.translate table: mapped character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: b for b in printable} | {b: 256 + k for k, b in enumerate(others)}
    return {char: chr(b) for b, char in mapping.items()}


def _has_type(node, name: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    return isinstance(node, list) and any(_has_type(v, name) for v in node)


def _tokenizer_json_identity(data: bytes, doc: dict | None = None) -> str | None:
    """A Hugging Face tokenizer.json: byte-level BPE (GPT-2 byte mapping inverted), SP-style BPE or Unigram.

    SP-style vocabularies (no ByteLevel pre-tokenizer/decoder) hash their token strings as UTF-8, as a SentencePiece
    model does; added tokens marked `special` and the model's unknown token are the specials. WordPiece, WordLevel
    and unreadable files give None.
    """
    try:
        doc = json.loads(data) if doc is None else doc
        model = doc["model"]
        if model.get("type") == "BPE":
            vocab = {int(i): tok for tok, i in model["vocab"].items()}
            unk = {i for i, tok in vocab.items() if tok == model.get("unk_token")}
        elif model.get("type") == "Unigram":
            vocab = {i: entry[0] for i, entry in enumerate(model["vocab"])}
            unk = set() if model.get("unk_id") is None else {int(model["unk_id"])}
        else:
            return None
        added = {int(a["id"]): (a["content"], bool(a.get("special"))) for a in doc.get("added_tokens") or []}
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None
    specials = {i for i, (_, special) in added.items() if special} | unk  # SentencePiece: unknown is special too
    tokens = {i: tok.encode("utf-8") for i, tok in vocab.items() if i not in specials}
    if _has_type(doc.get("pre_tokenizer"), "ByteLevel") or _has_type(doc.get("decoder"), "ByteLevel"):
        table = _byte_decoder()
        if {ord(c) for c in set("".join(vocab[i] for i in tokens))} - table.keys():
            return None  # a character outside GPT-2's byte mapping: not byte-level after all
        tokens = {i: vocab[i].translate(table).encode("latin-1") for i in tokens}
    for i, (content, special) in added.items():
        if not special and i not in tokens:  # plain added words are matched as written
            tokens[i] = content.encode("utf-8")
    return _digest(tokens, specials)
