"""LLM policies and value models: loading, generation, token records, queued tasks (no Ray, no HTTP)."""
