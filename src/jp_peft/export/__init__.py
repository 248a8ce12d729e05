"""Export: NeMo Megatron LoRA -> Hugging Face PEFT adapters, merged models, .nemo archives."""
