"""The two training engines behind one stage contract, and the one place that picks between them.

Each backend's stages module offers the same three functions, run inside a stage's process:
  import_model(spec, hf_dir, recipe) -> dict   extra facts for the import record (recipe: the
                                               composed llm.import_ckpt on Megatron, None on hf)
  train(spec, stage, recipe) -> StageMetrics   train a cpt/sft stage (recipe: the composed NeMo
                                               recipe on Megatron, None on hf)
  export(spec, stage) -> dict                  the export record of a trained stage (artifacts, parity)
"""

from __future__ import annotations


def stages_of(backend: str):
    if backend == "megatron":
        from jp_peft.backends import megatron_stages

        return megatron_stages
    if backend == "hf":
        from jp_peft.backends import hf_stages

        return hf_stages
    raise ValueError(f"backend: {backend!r} is not one of megatron, hf")
