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


def export_tokenizer(hf_dir: str | None, shard_meta: dict, key: str = "checkpoint.export_hf"):
    """The tokenizer a run's HF export writes: model.hf_dir's tokenizer files, else the tokenizer file the shards
    were made with (meta.json `tokenizer_model`, e.g. the launcher's tiny model has none), with the shards' chat
    template; refused in one line (before training) when neither holds one."""
    from pathlib import Path

    from megapack.errors import MegapackError
    from megapack.model.hf_tokenizer import prepare_tokenizer, tokenizer_file

    shards_file = shard_meta.get("tokenizer_model")
    hint = (f"set {key} null and export with `megapack convert megatron-to-hf --tokenizer-dir DIR` "
            f"(or --no-tokenizer)")
    for source in (hf_dir, shards_file):
        if source and Path(source).exists() and tokenizer_file(Path(source)) is not None:
            return prepare_tokenizer(source, shard_meta.get("template"), key, hint)
    raise MegapackError(f"{key}: model.hf_dir {hf_dir} holds no tokenizer file and the shards' tokenizer_model "
                        f"{shards_file} is not there; put the tokenizer files in model.hf_dir, or {hint}")
