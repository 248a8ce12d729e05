"""NeMo 2.0 recipe modules of jp-peft (one per model), importable so NeMo-Run can serialise their targets.

`compose(spec, stage)` is how the run layer gets the recipe a Megatron stage's task carries: the recipe
module of the spec's model, and its factory for the stage. Recipes compose NVIDIA's factories with the
helpers in jp_peft.backends.megatron; nothing below this package imports it.
"""

from __future__ import annotations

import importlib

# NeMo model config (spec model.nemo_config) -> the recipe module that composes its stages
RECIPE_MODULES = {"Qwen25Config500M": "jp_peft.recipes.qwen25_500m_ja"}


def recipe_module(spec):
    try:
        return importlib.import_module(RECIPE_MODULES[spec.model.nemo_config])
    except KeyError:
        raise ValueError(f"model.nemo_config: no jp-peft recipe for {spec.model.nemo_config!r} "
                         f"(recipes: {', '.join(RECIPE_MODULES)})") from None


def compose(spec, stage: str):
    """The composed NeMo recipe (a run.Partial) of one stage of a resolved spec."""
    module = recipe_module(spec)
    if stage not in module.FACTORIES:
        raise ValueError(f"{module.__name__} composes no {stage!r} stage (it composes {', '.join(module.FACTORIES)})")
    return module.FACTORIES[stage](spec=spec.to_dict())
