"""The third tokenizer backend: a Hugging Face `tokenizer.json`, run by the `tokenizers` library.

For checkpoints that ship only `tokenizer.json`. As in the other backends, `encode` treats special-token strings as
text: the file is loaded a second time without its special added tokens (and without its post-processor), so
"<|eot_id|>" typed by a user is split by the BPE model like any text, while templates emit special tokens by id.
BOS/EOS/PAD: LLaMA-3's names (<|begin_of_text|>, <|end_of_text|>, <|finetune_right_pad_id|> or id 128004, as the
tiktoken backend), else `tokenizer_config.json` beside the file, else "<s>"/"</s>", else "<|endoftext|>" (which also
serves as BOS for models without one, as Qwen's).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from megapack.data.render.tokenizer_base import (
    LLAMA3_NUM_RANKS, LLAMA3_NUM_SPECIAL, Tokenizer, read_model_file, reload_tokenizer,
)
from megapack.data.render.vocab import cached_identity, tokenizer_json_identity
from megapack.errors import MegapackError

LLAMA3_PAD_ID = LLAMA3_NUM_RANKS + 4  # "<|finetune_right_pad_id|>"; LLaMA-3.0's file calls it a reserved token


class TokenizerJsonTokenizer(Tokenizer):
    """A `tokenizer.json` (byte-level BPE such as LLaMA-3, or SentencePiece-style BPE / Unigram)."""

    def __init__(self, path: Path, data: bytes | None = None):
        import tokenizers

        self.path = Path(path)
        data = read_model_file(self.path) if data is None else data
        try:
            doc = json.loads(data)
            added = doc.get("added_tokens") or []
            self.special_tokens = {a["content"]: int(a["id"]) for a in added if a.get("special")}
            as_text = {**doc, "added_tokens": [a for a in added if not a.get("special")], "post_processor": None}
            self._tok = tokenizers.Tokenizer.from_str(json.dumps(as_text))
        except Exception as exc:  # json errors, missing keys, and the plain Exception that tokenizers raises
            raise MegapackError(f"{self.path}: not a readable tokenizer.json ({str(exc)[:200]})") from None
        self._names = {i: name for name, i in self.special_tokens.items()}
        self.file_sha256 = hashlib.sha256(data).hexdigest()
        identity = cached_identity(self.file_sha256, lambda: tokenizer_json_identity(data, doc))
        if identity is None:
            raise MegapackError(f"{self.path}: tokenizer.json model {doc['model'].get('type')!r} is not supported; "
                                "expected a BPE or Unigram model")
        self.identity, self.kind = identity, "tokenizer-json"
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True), max(self._names, default=-1) + 1)
        config = _config(self.path.parent)
        self.eos_id = self._pick(("<|end_of_text|>", config.get("eos_token"), "</s>", "<|endoftext|>"), "EOS")
        # Models without a BOS (Qwen) separate documents with their end-of-text token: it opens plain documents here
        self.bos_id = self._pick(("<|begin_of_text|>", config.get("bos_token"), "<s>", "<|endoftext|>"), "BOS",
                                 default=self.eos_id)
        llama3 = self.bos_id == LLAMA3_NUM_RANKS and len(self.special_tokens) == LLAMA3_NUM_SPECIAL
        pad = self.special_tokens.get("<|finetune_right_pad_id|>", LLAMA3_PAD_ID if llama3 else None)
        if pad is None:
            pad = self.special_tokens.get(config.get("pad_token") or "", self.eos_id)
        self.pad_id = pad

    def _pick(self, names: tuple, what: str, default: int | None = None) -> int:
        for name in names:
            if name in self.special_tokens:
                return self.special_tokens[name]
        if default is not None:
            return default
        raise MegapackError(f"{self.path}: no {what} token among the special tokens (looked for "
                            f"{', '.join(repr(n) for n in names if n)}); add tokenizer_config.json beside it")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS added, special-token strings encoded as ordinary text."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (the library's parallel batch path)."""
        batch = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [e.ids for e in batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Text of `ids` (special tokens rendered by name)."""
        out, run = [], []
        for i in map(int, ids):
            if i in self._names:
                out += [self._tok.decode(run), self._names[i]] if run else [self._names[i]]
                run = []
            else:
                run.append(i)
        return "".join(out + ([self._tok.decode(run)] if run else []))

    def __reduce__(self):
        return (reload_tokenizer, (type(self), str(self.path), self.file_sha256))


def _config(folder: Path) -> dict:
    """bos_token / eos_token / pad_token strings of a tokenizer_config.json beside the file (empty when absent)."""
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = config.get(key) if isinstance(config, dict) else None
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            out[key] = value
    return out
