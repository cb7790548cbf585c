"""Stage 1, sources: dataset files and LLaMA-Factory registries -> validated Conversation / Document records."""
