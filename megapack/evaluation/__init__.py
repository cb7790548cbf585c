"""`megapack eval`: EleutherAI's lm-evaluation-harness on an HF folder or a megapack checkpoint, offline."""
