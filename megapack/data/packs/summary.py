"""Human-readable summaries of a preprocess run / a shard directory's meta.json: the rows of its summary table."""
from __future__ import annotations


def _fmt(n: float) -> str:
    return f"{n:,}" if isinstance(n, int) else f"{n:,.4f}"


def table(rows: list[tuple[str, object]]) -> str:
    """Two aligned columns."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {_fmt(v) if isinstance(v, (int, float)) else v}" for k, v in rows)


def summary_rows(meta: dict) -> list[tuple[str, object]]:
    """The rows of the final summary table (records, skips by reason, truncation, tokens, packs, efficiency, time)."""
    rows: list[tuple[str, object]] = [
        ("records read", meta.get("num_records", "?")),
        ("skipped", sum(meta.get("skipped", {}).values())),
    ]
    rows += [(f"  skipped: {reason}", n) for reason, n in sorted(meta.get("skipped", {}).items())]
    rows += [
        ("packing", f"{meta['packing']} (L={meta['seq_length']}, seed={meta['seed']}, "
                    f"pad_to_multiple={meta['pad_to_multiple']})"),
        ("tokenizer", meta.get("tokenizer_identity", "?")),
        ("template", (meta.get("template") or {}).get("name", "?")),
    ]
    for split, s in meta["splits"].items():
        eff = s["packing_efficiency"]
        ratio = s["num_packs"] / s["lower_bound_packs"] if s["lower_bound_packs"] else 0.0
        rows += [
            (f"{split}: conversations", s["num_conversations"]),
            (f"{split}: truncated / dropped", f"{s['truncated']:,} / {s['dropped']:,}"),
            (f"{split}: tokens (trained tokens)", f"{s['num_tokens']:,} ({s['num_trained_tokens']:,})"),
            (f"{split}: packs (lower bound)", f"{s['num_packs']:,} ({s['lower_bound_packs']:,}, x{ratio:.5f})"),
            (f"{split}: packing efficiency", f"{eff:.2%}"),
            (f"{split}: shards", len(s["shards"])),
        ]
    if "wall_seconds" in meta:
        secs = meta["wall_seconds"]
        total = sum(s["num_tokens"] for s in meta["splits"].values())
        rows.append(("wall time", f"{secs:.1f} s ({total / max(secs, 1e-9) / 1e6:.2f} M tokens/s)"))
    if meta.get("reused_partitions"):
        rows.append(("reused partitions", meta["reused_partitions"]))
    return rows

