"""A Hugging Face `tokenizer.json` built from LLaMA-3's tiktoken ranks file, for exports that carry only the ranks.

The same construction as transformers' `TikTokenConverter` (byte-level BPE over the ranks, merges recovered from
them, `ignore_merges`, LLaMA-3's split pattern, the 256 special tokens from id 128000, BOS added by the
post-processor as in Meta's file), written with the `tokenizers` library alone so that it runs offline at export
time without transformers. Its ids equal megapack's tiktoken tokenizer and its `vocab_identity` the ranks file's.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from megapack.data.render.tokenizer_base import LLAMA3_PATTERN, parse_ranks, read_model_file


@lru_cache(maxsize=1)
def _byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character map (the byte-level alphabet of tokenizer.json files)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The BPE vocabulary and the merges that rebuild each token from two tokens of lower rank."""
    table = _byte_chars()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    merges: list[tuple[int, int, bytes, bytes]] = []
    for token, rank in ranks.items():
        local = [(ranks[token[:i]], ranks[token[i:]], token[:i], token[i:])
                 for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(rank, *m) for m in sorted(local)]
    merges.sort(key=lambda m: m[0])  # stable: within a rank, by the ranks of its halves
    return {text(t): r for t, r in ranks.items()}, [(text(left), text(right)) for _, _, _, left, right in merges]


def llama3_tokenizer_json(ranks_path: str | Path, special_tokens: dict[str, int]) -> str:
    """tokenizer.json text for a LLaMA-3 tiktoken ranks file and its special tokens ({name: id}, ids from 128000)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    path = Path(ranks_path)
    vocab, merges = _vocab_and_merges(parse_ranks(path, read_model_file(path)))
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    names = sorted(special_tokens, key=special_tokens.__getitem__)
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in names])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                      special_tokens=[(bos, special_tokens[bos])]),
    ])
    return tok.to_str()
