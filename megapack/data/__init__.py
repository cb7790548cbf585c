"""Offline data stage: readers, chat templates, tokenizers, packing and shards."""
