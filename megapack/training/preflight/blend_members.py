"""Preflight of a dataset mixture (`data.blend`): every member's metadata read and checked against the others.

The mixture's semantics and its runtime (schedule, sampler, per-member accounting) are in
`megapack.training.run.blend`.
"""
from __future__ import annotations

from pathlib import Path

from megapack.errors import MegapackError
from megapack.training.preflight.config import RunConfig


def _member_key(i: int) -> str:
    return f"data.blend[{i}].path"


def blend_preflight(config: RunConfig) -> tuple[dict, list, dict, list[dict]]:
    """Read and cross-check every member's metadata: (first member's meta with the blend's packing, shard sets,
    data identity, members). Members must share seq_length, pad_to_multiple, tokenizer identity, pad id and
    padded/packed layout; a difference is one line naming the member path and the value."""
    from megapack.data.packs.shards import read_meta
    from megapack.training.preflight.identity import data_identity, tokenizer_identity

    data = config.data
    metas = [read_meta(m.path) for m in data.blend]
    first = metas[0]
    ref = f"{_member_key(0)} {data.blend[0].path}"
    pad_ref = ("data.pad_to_multiple", data.pad_to_multiple) if data.pad_to_multiple is not None \
        else (ref, first.get("pad_to_multiple"))
    checks = [  # (what, value of a member's meta, where the expected value comes from, the expected value)
        ("seq_length", lambda meta: meta.get("seq_length"), ref, first.get("seq_length")),
        ("pad_to_multiple", lambda meta: meta.get("pad_to_multiple"), *pad_ref),
        ("tokenizer identity", tokenizer_identity, ref, tokenizer_identity(first)),
        ("pad_id", lambda meta: meta.get("pad_id"), ref, first.get("pad_id")),
        ("padding arm", lambda meta: meta.get("packing") == "padding", ref, first.get("packing") == "padding"),
    ]
    sets, members = [], []
    for i, (member, meta) in enumerate(zip(data.blend, metas)):
        for what, value, against, expected in checks:
            if value(meta) != expected:
                raise MegapackError(f"{_member_key(i)}: {member.path} has {what} {value(meta)!r}, but {against} "
                                    f"has {expected!r}; every blend member needs the same {what}")
        splits = meta.get("splits", {})
        if data.train_split not in splits:
            raise MegapackError(f"{_member_key(i)}: {Path(member.path) / 'meta.json'} has no split "
                                f"{data.train_split!r} (has: {', '.join(splits) or 'none'})")
        read = [data.train_split] + ([data.valid_split] if data.valid_split and data.valid_split in splits else [])
        sets.append((_member_key(i), Path(member.path), meta, read))
        members.append({"name": member.name, "path": member.path, "weight": member.weight,
                        "train_packs": int(splits[data.train_split]["num_packs"])})
    total = sum(m["weight"] for m in members)
    for m in members:
        m["weight"] /= total
    packings = list(dict.fromkeys(str(meta.get("packing", "unknown")) for meta in metas))
    meta = dict(first, packing="+".join(packings))
    identity = {"blend": [{"name": m["name"]} | data_identity(x) for m, x in zip(members, metas)],
                "packing": meta["packing"], "seq_length": first.get("seq_length")}
    return meta, sets, identity, members


def identity_change(saved: dict, identity: dict) -> str:
    """What differs between a checkpoint's data identity and a blend's, in a few words."""
    old, new = saved.get("blend") or [], identity["blend"]
    names_old, names_new = [m["name"] for m in old], [m["name"] for m in new]
    if names_old != names_new:
        return f"members {', '.join(names_old) or 'none (data.path)'} -> {', '.join(names_new)}"
    return "other packs in " + ", ".join(n for a, b, n in zip(old, new, names_new) if a != b)


