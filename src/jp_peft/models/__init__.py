"""Model architectures jp-peft trains, as plain data (shared by benchmarks and the real-shape tests)."""
