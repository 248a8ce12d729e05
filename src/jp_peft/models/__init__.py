"""Real model assets (tokenizers, configs) derived from registry packages at setup, never fetched at run time."""
