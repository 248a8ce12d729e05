"""The experiment spec: validation names the field, presets load, overrides apply."""

import pytest

from jp_peft.spec import (ClusterSpec, LoraSpec, SpecError, TrainSpec, apply_overrides,
                          experiment_from_dict, load_preset)

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kwargs, field", [
    ({"rank": 0}, "lora.rank"),
    ({"rank": -4}, "lora.rank"),
    ({"target_modules": ["q_proj", "qkv"]}, "lora.target_modules"),
    ({"dropout": 1.5}, "lora.dropout"),
    ({"dropout_position": "post"}, "lora.dropout_position"),
])
def test_lora_spec_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        LoraSpec(**kwargs)


def test_global_batch_must_divide_by_micro_batch_times_data_parallel():
    with pytest.raises(SpecError, match=r"train\.global_batch_size.*not divisible by micro_batch_size=4"):
        TrainSpec(global_batch_size=18, micro_batch_size=4)
    cluster = ClusterSpec(num_nodes=1, gpus_per_node=8)  # data parallel 8
    with pytest.raises(SpecError, match=r"cpt\.train\.global_batch_size.*4 x 8"):
        experiment_from_dict({"cluster": {"num_nodes": 1, "gpus_per_node": 8}, "stages": ["sft"],
                              "cpt": {"train": {"micro_batch_size": 4, "global_batch_size": 16}}})
    assert cluster.data_parallel_size == 8


def test_parallel_sizes_must_divide_world():
    with pytest.raises(SpecError, match="not divisible by tensor x pipeline x context parallel = 3"):
        ClusterSpec(gpus_per_node=8, tensor_parallel=3)
    assert ClusterSpec(num_nodes=2, gpus_per_node=8, tensor_parallel=2, pipeline_parallel=2).data_parallel_size == 4


def test_unknown_field_is_named_with_a_suggestion():
    with pytest.raises(SpecError, match=r"cpt\.train\.max_step: unknown field; did you mean 'max_steps'"):
        experiment_from_dict({"cpt": {"train": {"max_step": 10}}})


def test_overrides_parse_yaml_values_and_shorthands():
    values = apply_overrides({}, ["lora.rank=8", "train.lr=1e-3", "lora.target_modules=[q_proj,v_proj]",
                                  "wandb.enabled=false"])
    assert values["lora"] == {"rank": 8, "target_modules": ["q_proj", "v_proj"]}
    assert values["cpt"]["train"]["lr"] == pytest.approx(1e-3) and values["sft"]["train"]["lr"] == pytest.approx(1e-3)
    assert values["wandb"]["enabled"] is False
    with pytest.raises(SpecError, match="expected key=value"):
        apply_overrides({}, ["lora.rank"])


def test_presets_load_with_design_note_defaults(repo):
    spec = experiment_from_dict(load_preset(repo / "recipes/configs/qwen25_500m_ja.yaml"))
    # shared/seeds/000 section 10.1
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (32, 16, 0.1)
    assert len(spec.lora.target_modules) == 7
    t = spec.cpt.train
    assert (t.max_steps, t.micro_batch_size, t.global_batch_size, t.lr, t.warmup_steps, t.val_check_interval,
            t.precision, t.grad_clip) == (1000, 4, 16, 1e-4, 100, 100, "bf16-mixed", 1.0)
    assert [b.weight for b in spec.cpt.data.blend] == [0.9, 0.1]
    smoke = experiment_from_dict(load_preset(repo / "recipes/configs/smoke.yaml"))
    assert smoke.backend == "hf" and smoke.model.tiny


def test_missing_data_fails_before_launch_naming_the_field(tmp_path):
    spec = experiment_from_dict({"stages": ["cpt"], "cpt": {"data": {"blend": [
        {"name": "ja", "weight": 1.0, "prefix": str(tmp_path / "nothing_text_document")}],
        "val_ja": str(tmp_path / "v_text_document"), "val_en": str(tmp_path / "e_text_document")}}})
    with pytest.raises(SpecError, match=r"cpt\.data\.blend\[ja\].*not found"):
        spec.check_data_files()
