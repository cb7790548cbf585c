"""`megapack generate`: a trained model answering prompts and chats (loading, templates, decoding with a KV cache)."""
