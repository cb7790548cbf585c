"""What a run's inputs are, compared across shards and checkpoints: tokenizer identity and the packs' identity."""
from __future__ import annotations


def same_tokenizer(a: str | None, b: str | None) -> bool | None:
    """Whether two tokenizer identities are equal; None when either is missing or not a "vocab:" identity.

    Identities are `vocab_identity` values, the same for every file format of one vocabulary. Older shards and
    checkpoints recorded file digests ("tiktoken-llama3:<hex>", "<file>:sha256:<hex>"): those are not compared.
    """
    if not (a and b and a.startswith("vocab:") and b.startswith("vocab:")):
        return None
    return a == b


def tokenizer_identity(meta: dict) -> str | None:
    """The tokenizer identity of shard or checkpoint metadata (`tokenizer_identity`; older files: `tokenizer`)."""
    return meta.get("tokenizer_identity", meta.get("tokenizer"))


def data_identity(meta: dict) -> dict:
    """The identity of a shard directory's packs: sha256 over its files' checksums, the packing and seq_length."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(sorted(meta.get("sha256", {}).items())).encode()).hexdigest()
    return {"digest": digest, "packing": meta.get("packing"), "seq_length": meta.get("seq_length")}
