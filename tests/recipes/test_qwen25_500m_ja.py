"""NeMo 2.0 recipes: discovery (every factory builds offline) and field-by-field values."""

import importlib
import inspect
import pkgutil

import nemo_run as run
import pytest
from nemo.collections import llm

import jp_peft.recipes as recipes
from jp_peft.recipes import qwen25_500m_ja as recipe

pytestmark = pytest.mark.unit


def all_factories():
    found = []
    for module_info in pkgutil.iter_modules(recipes.__path__):
        module = importlib.import_module(f"jp_peft.recipes.{module_info.name}")
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__ and not name.startswith("_"):
                found.append((module.__name__, name, fn))
    return found


def test_every_recipe_factory_builds_with_defaults_and_is_registered():
    import catalogue

    factories = all_factories()
    assert len(factories) >= 4, factories  # model, import_base, cpt_lora, sft_lora
    registered = {key[-1] for key in catalogue.REGISTRY}
    for module, name, fn in factories:
        built = fn()
        assert isinstance(built, (run.Config, run.Partial)), (module, name)
    # @run.cli.factory put them in NeMo-Run's registry, under NVIDIA's targets
    assert {"qwen25_500m_ja", "qwen25_500m_ja_import", "qwen25_500m_ja_cpt", "qwen25_500m_ja_sft"} <= registered
    assert any(key[-2:] == ("nemo.collections.llm.api.finetune", "qwen25_500m_ja_cpt") for key in catalogue.REGISTRY)


def test_nemo_base_recipe_composes():
    """The real stack: NVIDIA's own Qwen2.5-0.5B finetune recipe builds (issue: foundation)."""
    base = llm.qwen25_500m.finetune_recipe(name="x", dir="/tmp/x", num_nodes=1, num_gpus_per_node=1, peft_scheme="lora")
    assert base.__fn_or_cls__ is llm.finetune
    assert base.model.__fn_or_cls__ is llm.Qwen2Model
    assert base.model.config.__fn_or_cls__ is llm.Qwen25Config500M


def test_cpt_recipe_values():
    cpt = recipe.cpt_lora()
    assert cpt.__fn_or_cls__ is llm.finetune
    assert cpt.model.config.__fn_or_cls__ is llm.Qwen25Config500M
    # PEFT: all seven projections -> fused LoRA on the four Megatron layers
    assert cpt.peft.__fn_or_cls__ is llm.peft.LoRA
    assert cpt.peft.target_modules == ["linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"]
    assert (cpt.peft.dim, cpt.peft.alpha, cpt.peft.dropout, cpt.peft.dropout_position) == (32, 16, 0.1, "pre")
    # Data: the weighted blend in Megatron's [w, prefix, ...] form
    assert cpt.data.__fn_or_cls__ is llm.PreTrainingDataModule
    train = cpt.data.paths["train"]
    assert train[0::2] == [0.9, 0.1]
    assert train[1].endswith("data/ja_cpt_text_document") and train[3].endswith("data/en_replay_text_document")
    assert cpt.data.paths["validation"][0].endswith("ja_cpt_val_text_document")
    assert (cpt.data.seq_length, cpt.data.micro_batch_size, cpt.data.global_batch_size) == (2048, 4, 16)
    # Trainer and parallelism
    t = cpt.trainer
    assert (t.max_steps, t.val_check_interval, t.num_nodes, t.devices) == (1000, 100, 1, 1)
    assert t.gradient_clip_val is None  # NeMo's MegatronMixedPrecision raises on it; Megatron clips in its optimizer
    assert (t.strategy.tensor_model_parallel_size, t.strategy.pipeline_model_parallel_size,
            t.strategy.context_parallel_size) == (1, 1, 1)
    assert t.plugins.precision == "bf16-mixed"
    # Optimiser: cosine with warmup
    assert (cpt.optim.config.lr, cpt.optim.config.clip_grad, cpt.optim.lr_scheduler.warmup_steps) == (1e-4, 1.0, 100)
    assert (cpt.optim.config.bf16, cpt.optim.config.fp16) == (True, False)  # follows train.precision
    # Data: the base model's own tokenizer (no GPT-2 download), masks that survive a resume
    from jp_peft.backends.megatron.data import ExactResumeGPTDataset

    assert cpt.data.tokenizer.pretrained_model_name == "Qwen/Qwen2.5-0.5B"
    assert cpt.data.dataset_cls is ExactResumeGPTDataset
    # Logging: W&B + TensorBoard, checkpoints every N steps
    wandb = cpt.log.wandb
    assert (wandb.project, wandb.group, wandb.job_type, wandb.name) == ("jp-peft", "qwen_lora_ja", "cpt", "cpt:qwen_lora_ja")
    assert "cpt" in wandb.tags and wandb.config["spec"]["lora"]["rank"] == 32
    assert cpt.log.tensorboard is not None
    assert cpt.log.ckpt.every_n_train_steps == 100
    callbacks = {c.__fn_or_cls__.__name__: c for c in cpt.trainer.callbacks}
    assert callbacks["MegatronStepMetrics"].tokens_per_step == 16 * 2048
    assert callbacks["MegatronStepMetrics"].flops_per_token == 2_609_905_664  # hand-checked in test_flops_and_compare
    assert set(callbacks) >= {"PreemptionCallback", "StepSeed", "LanguageValidation"}
    assert callbacks["LanguageValidation"].prefixes["en"].endswith("en_replay_val_text_document")
    assert cpt.log.log_dir.endswith("qwen_lora_ja/cpt") and cpt.log.name == "nemo"  # NeMo's own log dir
    # Resume: continue a requeued job, else start from the imported base
    assert cpt.resume.resume_if_exists and cpt.resume.resume_ignore_no_checkpoint
    assert cpt.resume.restore_config.path.endswith("models/Qwen/Qwen2.5-0.5B")


def test_sft_recipe_values():
    sft = recipe.sft_lora()
    assert sft.data.__fn_or_cls__ is llm.FineTuningDataModule
    assert sft.data.dataset_root.endswith("data/ja_sft")
    assert sft.data.packed_sequence_specs.packed_sequence_size == 2048
    assert sft.data.dataset_kwargs["prompt_template"] == "{input}{output}"
    assert sft.resume.restore_config.path.endswith("cpt/nemo_merged")  # starts from the merged CPT model
    assert sft.log.wandb.job_type == "sft"


def test_overrides_and_parallel_layout_reach_the_recipe(tmp_path):
    from jp_peft.spec import resolve_spec
    from jp_peft.spec import load_preset

    spec = resolve_spec(load_preset(recipe.PRESET), ["lora.target_modules=[q_proj,k_proj,v_proj]", "lora.rank=8",
                                                     "cluster.num_nodes=2", "cluster.gpus_per_node=8",
                                                     "cluster.tensor_parallel=2", "train.global_batch_size=64"])
    cpt = recipe.cpt_lora(spec=spec.to_dict())
    assert cpt.peft.__fn_or_cls__ is llm.peft.LoRA and cpt.peft.target_modules == ["linear_qkv"]
    assert cpt.peft.dim == 8
    assert (cpt.trainer.num_nodes, cpt.trainer.devices, cpt.trainer.strategy.tensor_model_parallel_size) == (2, 8, 2)
    assert cpt.data.global_batch_size == 64


def test_import_recipe_composes_nemos_import_with_a_model_to_build(tmp_path, monkeypatch):
    import fiddle as fdl
    from nemo.lightning.io.mixin import ConnectorMixin

    from jp_peft.backends.megatron import compose as megatron
    from jp_peft.spec import resolve_spec
    from jp_peft.spec import load_preset

    monkeypatch.setenv("NEMO_HOME", str(tmp_path))
    imp = recipe.import_base()
    assert imp.__fn_or_cls__ is llm.import_ckpt and imp.source == "hf://Qwen/Qwen2.5-0.5B"
    assert imp.output_path == str(tmp_path / "models" / "Qwen" / "Qwen2.5-0.5B")
    assert isinstance(fdl.build(imp.model), ConnectorMixin)  # an instance, as import_ckpt needs (bug 1)
    local = tmp_path / "hf" / "Qwen2.5-0.5B"
    local.mkdir(parents=True)
    spec = resolve_spec(load_preset(recipe.PRESET), [f"model.name={local}"])
    assert megatron.imported_base_path(spec) == tmp_path / "models" / "local" / "Qwen2.5-0.5B"


def test_tiny_cpu_recipe_changes_only_size_and_device_fields():
    """--smoke --backend megatron: NVIDIA's recipe with the tiny model's shape and CPU device fields."""
    from jp_peft.spec import resolve_spec
    from jp_peft.spec import load_preset

    smoke = resolve_spec(load_preset(recipe.PRESET.parent / "smoke.yaml"), ["backend=megatron", "cluster.accelerator=cpu"])
    production = recipe.cpt_lora()
    cpt = recipe.cpt_lora(spec=smoke.to_dict())
    c = cpt.model.config
    assert c.__fn_or_cls__ is llm.Qwen25Config500M
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size, c.num_attention_heads, c.num_query_groups, c.vocab_size) \
        == (4, 192, 512, 6, 2, 2048)
    assert (c.use_cpu_initialization, c.masked_softmax_fusion) == (True, False)
    assert cpt.trainer.accelerator == "cpu" and production.trainer.accelerator == "gpu"
    assert cpt.trainer.strategy.ckpt_optim_fully_reshardable is True
    assert cpt.peft.__fn_or_cls__ is production.peft.__fn_or_cls__
    assert cpt.optim.__fn_or_cls__ is production.optim.__fn_or_cls__
    assert cpt.optim.config.use_distributed_optimizer is True  # Megatron DDP + distributed optimizer, as on GPU
    sft = recipe.sft_lora(spec=smoke.to_dict())
    assert sft.data.packed_sequence_specs is None and recipe.sft_lora().data.packed_sequence_specs is not None


def test_megatron_on_cpu_is_only_for_the_tiny_model():
    from jp_peft.backends import backend_of
    from jp_peft.spec import SpecError, load_preset, resolve_spec

    spec = resolve_spec(load_preset(recipe.PRESET), ["cluster.accelerator=cpu"])  # a valid spec of fields ...
    with pytest.raises(SpecError, match="cluster.accelerator: the Megatron backend runs on CPU only for the embedded tiny"):
        backend_of(spec).validate(spec)  # ... that the backend refuses when the experiment is planned


def test_megatron_on_cpu_takes_a_local_directory_of_the_recipe_architecture(tmp_path):
    """The real-shape CPU tier: a local Qwen2.5-0.5B-shaped directory runs NeMo's Megatron path on CPU
    (jp_peft.models.real_shape); a directory of another shape is still refused, naming model.name."""
    import json

    from jp_peft.backends import backend_of
    from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG
    from jp_peft.spec import SpecError, load_preset, resolve_spec

    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(json.dumps(QWEN25_05B_HF_CONFIG))
    spec = resolve_spec(load_preset(recipe.PRESET), ["cluster.accelerator=cpu", f"model.name={real}"])
    backend_of(spec).validate(spec)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**QWEN25_05B_HF_CONFIG, "num_hidden_layers": 2}))
    spec = resolve_spec(load_preset(recipe.PRESET), ["cluster.accelerator=cpu", f"model.name={other}"])
    with pytest.raises(SpecError, match="model.name: .* is not the architecture the recipe builds: num_hidden_layers 2"):
        backend_of(spec).validate(spec)
