"""Import this module to register jp-peft's NeMo connectors, as NeMo's own `@io.model_exporter` modules do:

    import jp_peft.backends.megatron.nemo_exporters  # noqa: F401
    from nemo.collections import llm
    llm.export_ckpt(path="runs/x/cpt/checkpoints/...-last", target="hf-peft", output_path="adapter/")

Registered: the exact Qwen2 LoRA/CanonicalLoRA -> Hugging Face PEFT exporter (`hf-peft`, jp_peft.backends.megatron.hf_peft).
`import jp_peft` alone imports no NeMo (20 s); this module does.
"""

from jp_peft.backends.megatron.hf_peft import register_qwen2_hf_peft_exporter

HF_PEFT_EXPORTER = register_qwen2_hf_peft_exporter()
