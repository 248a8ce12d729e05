"""jp-peft: NeMo 2.0 recipes for LoRA continual learning of Qwen2.5-0.5B on Japanese."""

__version__ = "0.1.0"
