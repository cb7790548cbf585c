"""Stage 3, packs: packing plans, the shard format (FORMAT.md) and its writer, reader, statistics and inspection."""
