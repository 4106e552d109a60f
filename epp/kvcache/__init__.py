"""KV-cache awareness: vLLM KV events -> a block index -> prefix matches per endpoint."""
