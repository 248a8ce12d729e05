"""Spec of the training methods and early stopping: values, defaults, overrides, the fingerprint, the
Megatron backend's refusals (plan time, naming the field)."""

import pytest

from jp_peft.records.fingerprint import fingerprint
from jp_peft.spec import METHODS, SpecError, TrainSpec, apply_overrides, experiment_from_dict

pytestmark = pytest.mark.unit


def _spec(*overrides, backend="hf"):
    return experiment_from_dict(apply_overrides({"backend": backend, "stages": ["sft"]}, list(overrides)))


def test_defaults_are_todays_behaviour():
    spec = _spec()
    assert (spec.cpt.method, spec.sft.method) == ("lora", "lora")
    assert spec.cpt.train.embed_lr is None and spec.cpt.train.early_stopping_patience == 0
    assert METHODS == ("lora", "lora_embed", "full")


@pytest.mark.parametrize("method", METHODS)
def test_method_override_sets_one_stage_and_changes_the_fingerprint(method):
    spec = _spec(f"cpt.method={method}")
    assert spec.cpt.method == method and spec.sft.method == "lora"
    assert (fingerprint(spec) == fingerprint(_spec())) == (method == "lora")


@pytest.mark.parametrize("overrides, field", [
    (["cpt.method=qlora"], r"cpt\.method: 'qlora' is not one of lora, lora_embed, full"),
    (["sft.method=3"], r"sft\.method: expected str"),
    (["train.embed_lr=0"], r"cpt\.train\.embed_lr: must be positive"),
    (["train.early_stopping_patience=-1"], r"cpt\.train\.early_stopping_patience: must be an integer >= 0"),
    (["train.early_stopping_patience=1.5"], r"cpt\.train\.early_stopping_patience: expected int"),
    (["train.early_stopping_min_delta=-0.1"], r"cpt\.train\.early_stopping_min_delta: must be >= 0"),
    (["cpt.method=lora_embed", "train.embed_lr=1e-5"], r"sft\.train\.embed_lr: only method lora_embed .* 'lora'"),
    (["cpt.train.early_stopping_patience=1", "cpt.train.max_steps=50", "cpt.train.warmup_steps=5"],
     r"cpt\.train\.early_stopping_patience: needs validations: val_check_interval=100 is beyond max_steps=50"),
])
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(SpecError, match=field):
        _spec(*overrides)


def test_train_shorthand_sets_both_stages_and_fingerprints():
    spec = _spec("cpt.method=lora_embed", "sft.method=lora_embed", "train.embed_lr=1e-5",
                 "train.early_stopping_patience=3", "train.early_stopping_min_delta=0.01")
    for stage in (spec.cpt, spec.sft):
        assert stage.train.embed_lr == 1e-5 and stage.train.early_stopping_patience == 3
        assert stage.train.early_stopping_min_delta == 0.01
    assert fingerprint(spec) != fingerprint(_spec())
    assert TrainSpec(early_stopping_patience=0).early_stopping_patience == 0


@pytest.mark.parametrize("overrides, expected", [
    (["cpt.method=full"], {("cpt", "method"): "full", ("sft", "method"): "lora"}),
    (["sft.method=lora_embed", "sft.train.embed_lr=1e-4"],
     {("sft", "method"): "lora_embed", ("sft", "train", "embed_lr"): 1e-4, ("cpt", "method"): "lora",
      ("cpt", "train", "embed_lr"): None}),
    (["cpt.train.early_stopping_patience=2"],
     {("cpt", "train", "early_stopping_patience"): 2, ("sft", "train", "early_stopping_patience"): 0}),
])
def test_both_backends_take_every_method(overrides, expected):
    from jp_peft.backends import backend_of

    for backend in ("megatron", "hf"):
        spec = _spec(*overrides, backend=backend)
        assert spec.backend == backend
        for path, value in expected.items():  # the override landed where it says, and nowhere else
            got = spec
            for name in path:
                got = getattr(got, name)
            assert got == value and type(got) is type(value), (backend, path, got)
        backend_of(spec).validate(spec)  # and the backend accepts it (raises SpecError otherwise)
