"""Real model assets as plain data: Qwen2.5-0.5B's architecture (shapes.py, shared by the benchmarks and the
real-shape tests) and its tokenizer, derived from a registry package at setup (qwen_tokenizer.py)."""
