"""A KV-cache-aware endpoint picker (Envoy ext_proc) for LLM inference."""

__version__ = "0.1.0"
