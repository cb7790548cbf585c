"""The preprocessing job: partitions of records encoded in parallel (encode), then packed into shards (preprocess)."""
