"""The OpenAI-compatible HTTP server (`heron serve`)."""
