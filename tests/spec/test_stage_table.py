"""The stage table and the backend registry: the seams every other part reads (ARCHITECTURE.md)."""

from __future__ import annotations

import dataclasses

import pytest

from jp_peft.backends import IMPLEMENTATIONS, ONE_PROCESS, Backend, backend_of
from jp_peft.spec import SpecError, load_preset, resolve_spec
from jp_peft.spec import stages as table
from jp_peft.spec.fields import BACKENDS

pytestmark = pytest.mark.unit


def test_the_table_is_consistent():
    assert table.STAGES == ("import", "data", "cpt", "sft", "dpo", "export", "eval")
    assert table.DEFAULT_STAGES == ("import", "data", "cpt", "sft", "export", "eval")  # dpo: only when named
    assert table.SHARED_STAGES == ("import", "data") and table.TRAINED_STAGES == ("cpt", "sft", "dpo")
    order = {name: i for i, name in enumerate(table.STAGES)}
    for row in table.TABLE:
        if row.kind == table.TRAIN:
            assert row.section == row.name and row.data_kind in (table.BLEND, table.CHAT, table.PREFERENCE), row
            assert row.what, row  # the model cards say what the stage did
        for earlier in row.starts_from:  # a stage starts from trained stages that run before it
            assert table.is_trained(earlier) and order[earlier] < order[row.name], row
        assert set(row.backends) <= set(BACKENDS), row
        for backend, _ in row.refused:  # a reason is given only for a backend the row leaves out
            assert backend not in row.backends, row
    with pytest.raises(ValueError, match="unknown stage 'ppo'; the stages are import, data, cpt"):
        table.stage("ppo")


def test_what_a_trained_stage_starts_from_follows_the_run():
    assert table.previous_trained("sft", ("import", "data", "cpt", "sft")) == "cpt"
    assert table.previous_trained("sft", ("import", "data", "sft")) is None  # SFT alone: from the base
    assert table.previous_trained("cpt", table.STAGES) is None


def test_the_registry_implements_every_backend_name():
    assert tuple(IMPLEMENTATIONS) == BACKENDS
    for name in BACKENDS:
        backend = backend_of(name)
        assert isinstance(backend, Backend) and backend.name == name
        assert backend_of(name) is backend  # loaded once
    with pytest.raises(ValueError, match="backend: 'bridge' is not one of megatron, hf"):
        backend_of("bridge")


def test_launch_needs_come_from_the_backend(tmp_path):
    smoke = load_preset("smoke")
    hf = resolve_spec(smoke, [f"output_dir={tmp_path}", "backend=hf"])
    megatron = resolve_spec(smoke, [f"output_dir={tmp_path}", "backend=megatron", "cluster.gpus_per_node=4",
                                    "train.micro_batch_size=1", "train.global_batch_size=8"])
    assert all(backend_of(hf).launch_needs(hf, s) == ONE_PROCESS for s in table.STAGES)
    needs = backend_of(megatron).launch_needs(megatron, "cpt")
    assert (needs.nodes, needs.processes_per_node, needs.distributed, needs.on_cpu) == (1, 4, True, False)
    assert backend_of(megatron).launch_needs(megatron, "export") == ONE_PROCESS
    assert [s for s in table.STAGES if backend_of(megatron).composes(s)] == ["import", "cpt", "sft"]
    assert not any(backend_of(hf).composes(s) for s in table.STAGES)


def test_a_stage_a_backend_does_not_run_is_refused_naming_the_field(tmp_path, monkeypatch):
    # A row whose backends column leaves megatron out (as a DPO row would): the spec refuses it at once
    monkeypatch.setitem(table.BY_NAME, "eval", dataclasses.replace(table.BY_NAME["eval"], backends=("hf",)))
    with pytest.raises(SpecError, match="stages: the eval stage runs on the hf backend, not megatron"):
        resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "backend=megatron"])
    resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "backend=hf"])  # the backend it names runs it


@pytest.mark.parametrize("overrides, message", [
    (["cluster.gpus_per_node=2", "cluster.tensor_parallel=2"],
     r"cluster: the hf backend is data parallel only \(tensor_parallel=2\); use --backend megatron"),
    (["cluster.gpus_per_node=2", "cpt.train.global_batch_size=12"],
     r"cpt.train.global_batch_size: 12 is not divisible by micro_batch_size x data_parallel_size = 4 x 2"),
    (["cluster.gpus_per_node=2", "model.quantization=nf4"], r"model.quantization: QLoRA on the hf backend trains on one device"),
    (["cluster.gpus_per_node=2", "stages=[import,data,cpt,sft,dpo]"],
     r"cluster: dpo \(TRL's DPO\) trains on one device on the hf backend"),
], ids=["tensor-parallel", "batch-split", "qlora", "dpo"])
def test_the_hf_backend_refuses_what_ddp_cannot_train_at_plan_time(tmp_path, overrides, message):
    with pytest.raises(SpecError, match=message):  # the spec's own checks, or the backend's
        spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "backend=hf", *overrides])
        backend_of(spec).validate(spec)


def test_the_hf_backend_trains_on_several_devices_as_ddp_ranks_torchrun_starts(tmp_path):
    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "backend=hf", "cluster.gpus_per_node=2"])
    backend = backend_of(spec)
    backend.validate(spec)  # 8 = 4 micro x 2 ranks: each rank trains one micro batch of every step
    needs = backend.launch_needs(spec, "cpt")
    assert (needs.nodes, needs.processes_per_node, needs.distributed) == (1, 2, True)
    assert backend.launch_needs(spec, "export").processes_per_node == 1  # the light stages stay one process


def test_recipes_compose_only_the_stages_they_have(tmp_path):
    from jp_peft.recipes import compose

    spec = resolve_spec(load_preset("smoke"), [f"output_dir={tmp_path}", "backend=megatron", "cluster.accelerator=cpu"])
    with pytest.raises(ValueError, match="composes no 'eval' stage"):
        compose(spec, "eval")


def test_spec_fields_lists_every_field_with_its_default_and_help():
    import subprocess
    import sys

    from jp_peft.spec.reference import field_rows

    rows = {path: (kind, default, text) for path, kind, default, text in field_rows()}
    assert rows["cpt.train.lr"] == ("float", "0.0001", "peak learning rate (cosine schedule with warmup)")
    assert rows["lora.rank"][:2] == ("int", "32") and rows["sft.data.packing"][1] == "True"
    assert all(text for _, _, text in rows.values())  # a comment above every field in spec/fields.py
    out = subprocess.run([sys.executable, "-m", "jp_peft.cli", "spec", "fields"], capture_output=True, text=True,
                         timeout=120).stdout
    assert "eval.limit" in out and "score only the first N items of each task" in out
