"""Japanese data pipeline: read, validate, clean, deduplicate, tokenise, write."""
