"""OpenAI request and response parsing."""
