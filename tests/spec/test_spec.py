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
    spec = experiment_from_dict(load_preset("qwen25_500m_ja"))
    # shared/seeds/000 section 10.1
    assert (spec.lora.rank, spec.lora.alpha, spec.lora.dropout) == (32, 16, 0.1)
    assert len(spec.lora.target_modules) == 7
    t = spec.cpt.train
    assert (t.max_steps, t.micro_batch_size, t.global_batch_size, t.lr, t.warmup_steps, t.val_check_interval,
            t.precision, t.grad_clip) == (1000, 4, 16, 1e-4, 100, 100, "bf16-mixed", 1.0)
    assert [b.weight for b in spec.cpt.data.blend] == [0.9, 0.1]
    smoke = experiment_from_dict(load_preset("smoke"))
    assert smoke.backend == "hf" and smoke.model.tiny


def test_missing_data_fails_before_launch_naming_the_field(tmp_path):
    spec = experiment_from_dict({"stages": ["cpt"], "cpt": {"data": {"blend": [
        {"name": "ja", "weight": 1.0, "prefix": str(tmp_path / "nothing_text_document")}],
        "val_ja": str(tmp_path / "v_text_document"), "val_en": str(tmp_path / "e_text_document")}}})
    with pytest.raises(SpecError, match=r"cpt\.data\.blend\[ja\].*not found"):
        spec.check_data_files()


@pytest.mark.parametrize("override, field", [
    ("eval.limit=0", "eval.limit: must be a positive integer"),
    ("eval.num_fewshot=-1", "eval.num_fewshot: must be a non-negative integer"),
    ("eval.batch_size=0", "eval.batch_size: must be a positive integer"),
    ("eval.max_new_tokens=0", "eval.max_new_tokens: must be a positive integer"),
    ("eval.tasks_ja=[jpeft_jcqa, '']", "eval.tasks_ja: expected names"),
    ("eval.limt=3", "eval.limt: unknown field; did you mean 'limit'"),
])
def test_eval_fields_reject_bad_values_naming_the_field(repo, override, field):
    from jp_peft.spec import resolve_spec

    with pytest.raises(SpecError, match=field.replace(".", r"\.").replace("[", r"\[")):
        resolve_spec(load_preset("smoke"), [override])


def test_eval_overrides_apply_and_presets_set_the_suites(repo, tmp_path):
    from jp_peft.spec import resolve_spec

    smoke = load_preset("smoke")
    spec = resolve_spec(smoke, ["eval.limit=10", "eval.tasks_ja=jpeft_jcqa,jpeft_marc", "eval.tasks_en=[]",
                                "eval.generation=false", "eval.data_dir=lm_eval_data"], cwd=tmp_path)
    assert (spec.eval.limit, spec.eval.tasks_ja, spec.eval.tasks_en, spec.eval.generation) == \
        (10, ("jpeft_jcqa", "jpeft_marc"), (), False)
    assert spec.eval.data_dir == str(tmp_path / "lm_eval_data")  # absolute: stages run in other directories
    assert experiment_from_dict(spec.to_dict()) == spec
    defaults = resolve_spec(smoke, []).eval
    assert defaults.tasks_ja == ("jpeft_jcqa", "jpeft_jnli", "jpeft_marc", "jpeft_ja_cont")
    assert defaults.tasks_en == ("jpeft_en_mc", "jpeft_en_cont")
    assert (defaults.num_fewshot, defaults.limit) == (0, None)  # every item: the continuation sets need hundreds
    production = experiment_from_dict(load_preset("qwen25_500m_ja")).eval
    assert (production.tasks_ja, production.tasks_en, production.limit) == (("ja_leaderboard",), ("en",), None)
    from jp_peft.evaluation.tasks import resolve_tasks

    assert [s.name for s in resolve_tasks(production.tasks_en)] == ["hellaswag", "arc_easy", "xwinograd_en"]


def test_eval_fields_are_in_the_eval_stages_fingerprint_only(repo, tmp_path):
    """Changing a task limit reruns the eval stage and keeps the trained stages (and their run directory)."""
    from jp_peft.spec import resolve_spec
    from jp_peft.records.fingerprint import fingerprint
    from jp_peft.run.locks import check_reuse
    from jp_peft.records.layout import spec_file, write_json

    smoke = load_preset("smoke")
    old = resolve_spec(smoke, [f"output_dir={tmp_path}"])
    new = resolve_spec(smoke, [f"output_dir={tmp_path}", "eval.limit=10"])
    for stage in ("cpt", "sft", "export"):
        assert fingerprint(new, stage) == fingerprint(old, stage) == fingerprint(old)
    assert fingerprint(new, "eval") != fingerprint(old, "eval")
    write_json(spec_file(old), old.to_dict())
    assert check_reuse([new], overwrite=False) == []  # not refused
    retrained = resolve_spec(smoke, [f"output_dir={tmp_path}", "cpt.data.replay_ratio=0.3"])
    assert fingerprint(retrained, "cpt") != fingerprint(old, "cpt")
    with pytest.raises(SpecError, match=r"cpt\.data\.replay_ratio: null -> 0\.3"):
        check_reuse([retrained], overwrite=False)


def _blend(*entries):
    return [{"name": n, "weight": w, "lang": lang, "prefix": f"/d/{n}_text_document"} for n, w, lang in entries]


def test_replay_ratio_rewrites_the_cpt_blend_weights_for_both_backends(repo):
    from jp_peft.data.blend import nemo_blend_paths
    from jp_peft.spec import resolve_spec
    from jp_peft.records.fingerprint import fingerprint

    smoke = load_preset("smoke")
    declared = resolve_spec(smoke, []).cpt.data
    assert [(b.name, b.weight) for b in declared.blend] == [("ja", 0.9), ("en_replay", 0.1)]
    spec = resolve_spec(smoke, ["cpt.data.replay_ratio=0.3"])
    data = spec.cpt.data
    assert [(b.name, b.lang) for b in data.blend] == [("ja", "ja"), ("en_replay", "en")]
    assert data.blend_weights() == pytest.approx([0.7, 0.3])  # the hf backend's sampler weights
    paths = nemo_blend_paths(list(data.blend))  # the Megatron backend's PreTrainingDataModule paths
    assert paths[0::2] == pytest.approx([0.7, 0.3]) and paths[1::2] == [b.prefix for b in declared.blend]
    # a resolved spec read back (what every stage does) is the same spec, with the same fingerprint
    again = experiment_from_dict(spec.to_dict())
    assert again == spec and fingerprint(again) == fingerprint(spec)
    # r = 0: no replay at all; the English entry leaves the blend (a weight must be positive)
    none = resolve_spec(smoke, ["cpt.data.replay_ratio=0"]).cpt.data
    assert [(b.name, b.weight) for b in none.blend] == [("ja", 1.0)]
    assert experiment_from_dict(resolve_spec(smoke, ["cpt.data.replay_ratio=0"]).to_dict()).cpt.data == none


def test_replay_ratio_keeps_the_proportions_within_each_language():
    from jp_peft.spec import DataSpec

    data = DataSpec(blend=_blend(("web", 6, "ja"), ("books", 3, "ja"), ("en_a", 1, "en"), ("en_b", 3, "en")),
                    replay_ratio=0.2)
    assert [b.weight for b in data.blend] == pytest.approx([0.8 * 2 / 3, 0.8 / 3, 0.2 / 4, 0.2 * 3 / 4])
    assert [b.name for b in data.blend] == ["web", "books", "en_a", "en_b"]


@pytest.mark.parametrize("values, message", [
    ({"cpt": {"data": {"blend": _blend(("ja", 1, "ja"), ("en", 1, "en")), "replay_ratio": 1.0}}},
     r"cpt\.data\.replay_ratio: must be in \[0, 1\)"),
    ({"cpt": {"data": {"blend": _blend(("ja", 1, "ja")), "replay_ratio": 0.3}}},
     r"cpt\.data\.replay_ratio: the blend has no English entry"),
    ({"cpt": {"data": {"blend": _blend(("en", 1, "en")), "replay_ratio": 0.3}}},
     r"cpt\.data\.replay_ratio: the blend has no Japanese entry"),
    ({"sft": {"data": {"replay_ratio": 0.3}}}, r"sft\.data\.replay_ratio: there is no blend"),
    ({"cpt": {"data": {"blend": _blend(("ja", 1, "ja")), "replay_ratio": "lots"}}},
     r"cpt\.data\.replay_ratio: expected float or NoneType, got 'lots'"),
])
def test_replay_ratio_mistakes_name_the_field(values, message):
    with pytest.raises(SpecError, match=message):
        experiment_from_dict(values)
