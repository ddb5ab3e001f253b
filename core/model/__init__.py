"""Model: loading causal LMs, the one chat-template encoding, and batched generation."""
