"""Stage 3, packs: pack assignments (packing), the shard format (FORMAT.md) and its writer, reader, checks, summary
and views, and the padding arm's micro-batch rule."""
