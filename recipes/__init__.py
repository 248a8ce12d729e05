"""NeMo 2.0 recipe modules of jp-peft (one per model), importable so NeMo-Run can serialise their targets."""
