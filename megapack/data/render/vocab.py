"""Vocabulary identity: "vocab:<sha256>" of a vocabulary's content (token bytes by id, special token ids),
independent of the file format, so a tiktoken ranks file and the `tokenizer.json` of the same LLaMA-3 vocabulary,
or a SentencePiece model and its SP-style `tokenizer.json`, compare equal. Tokenizers record it as `identity`,
and shard metadata and converted checkpoints carry it.
"""
from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from megapack.data.render.tokenizer_base import (
    LLAMA3_NUM_RANKS, LLAMA3_NUM_SPECIAL, parse_ranks, read_model_file, sniff_kind,
)
from megapack.errors import MegapackError

_IDENTITIES: dict[str, str | None] = {}  # sha256 of a file -> its vocab_identity (computing one takes ~0.1-0.4 s)


def vocab_identity(path: str | Path, data: bytes | None = None) -> str | None:
    """'vocab:<64 hex>' of a tiktoken ranks file, SentencePiece model or tokenizer.json; None for other formats."""
    data = read_model_file(Path(path)) if data is None else data
    return cached_identity(hashlib.sha256(data).hexdigest(), lambda: _identity_of(Path(path), data))


def cached_identity(file_sha256: str, compute: Callable[[], str | None]) -> str | None:
    """The identity of the file with this sha256, computed once per process."""
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


def tiktoken_identity(ranks: dict[bytes, int]) -> str | None:
    """The identity of a LLaMA-3 tiktoken ranks table (None for other rank counts)."""
    if len(ranks) != LLAMA3_NUM_RANKS:  # megapack reads tiktoken files as LLaMA-3 only
        return None
    return _digest({rank: token for token, rank in ranks.items()},
                   range(LLAMA3_NUM_RANKS, LLAMA3_NUM_RANKS + LLAMA3_NUM_SPECIAL))


def sentencepiece_identity(sp) -> str:
    """Pieces by id as UTF-8 (with "▁"); control and unknown pieces are the specials. Scores and types are ignored."""
    n = sp.get_piece_size()
    specials = [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    skip = set(specials)
    return _digest({i: sp.id_to_piece(i).encode("utf-8") for i in range(n) if i not in skip}, specials)


def _identity_of(path: Path, data: bytes) -> str | None:
    if data.lstrip()[:1] == b"{":
        return tokenizer_json_identity(data)
    try:
        kind = sniff_kind(path, data)
        if kind == "tiktoken":
            return tiktoken_identity(parse_ranks(path, data))
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromSerializedProto(data)
        return sentencepiece_identity(sp)
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


def tokenizer_json_identity(data: bytes, doc: dict | None = None) -> str | None:
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
