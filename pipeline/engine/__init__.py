"""The caption actor: one vLLM engine per actor, the engine loop that steps it, and admission of
requests into it."""
