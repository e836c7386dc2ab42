"""``tpllama serve``: OpenAI-compatible routes, request validation, the bridge to the engine's
loop, and metrics."""
