"""Plan-time checks for offline compute nodes: a hub model name with a profile that sets HF_HUB_OFFLINE, and,
with a container profile, every path a job reads or writes outside the mounts (or mounted at another path),
each naming the profile field, before any file is written; the light stages' own request (light_*)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from jp_peft.cluster import executors
from jp_peft.cluster.executors import ProfileError, load_profile, slurm_executor
from jp_peft.cluster.offline import offline_problems
from jp_peft.models.shapes import QWEN25_05B_HF_CONFIG
from jp_peft.run.launch import launch
from jp_peft.spec import load_preset, resolve_spec

pytestmark = pytest.mark.unit


def _model_dir(root: Path) -> Path:
    """What model.name's plan-time check accepts: Qwen2.5-0.5B's config.json, a tokenizer and weights."""
    model = root / "models" / "Qwen2.5-0.5B"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(QWEN25_05B_HF_CONFIG))
    (model / "tokenizer.json").write_text("{}")
    (model / "model.safetensors").write_text("")
    return model


def _profile(root: Path, **fields) -> Path:
    """A site profile with no placeholder: offline nodes, a container, `root` mounted at its own path."""
    values = {"account": "lab", "partition": "batch", "gpus_per_node": 8, "exclusive": True, "mem": "0",
              "container_image": "nvcr.io/nvidia/nemo:26.02",
              "container_mounts": [f"{root}:{root}", f"{root}/nemo_home:/root/.cache/nemo"],
              "env": {"HF_HUB_OFFLINE": "1", "NEMO_HOME": "/root/.cache/nemo"}, **fields}
    path = root / "site.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _spec(root: Path, *overrides: str):
    return resolve_spec(load_preset("qwen25_500m_ja"), [f"output_dir={root}/runs", *overrides], cwd=root)


def test_a_hub_model_name_on_offline_nodes_is_refused_naming_the_env_field(tmp_path):
    profile = load_profile(str(_profile(tmp_path, container_mounts=[], container_image=None)))
    problems = offline_problems(profile, _spec(tmp_path))
    assert problems == [f"{profile.path}: env.HF_HUB_OFFLINE=1 (compute nodes without hub access) but model.name "
                        "is the hub name Qwen/Qwen2.5-0.5B: download it once (`hf download Qwen/Qwen2.5-0.5B "
                        "--local-dir DIR`, DIR on the shared filesystem) and pass --hf-model DIR (model.name=DIR)"]
    assert offline_problems(profile, _spec(tmp_path, f"model.name={_model_dir(tmp_path)}")) == []
    online = dataclasses.replace(profile, env={})
    assert offline_problems(online, _spec(tmp_path)) == []


def test_every_path_a_job_uses_must_lie_under_a_mount_at_its_own_path(tmp_path):
    root = tmp_path / "lustre"
    model = _model_dir(root)
    profile = load_profile(str(_profile(root)))
    # the bundled data sources ({repo}/data/...) are outside `root`: mount the checkout too
    spec = _spec(root, f"model.name={model}")
    (outside,) = offline_problems(profile, spec)  # one line for every path no mount holds
    assert outside.startswith(f"{profile.path}: container_mounts: no mount's host side holds ")
    val_ja = str(spec.cpt.data.val_ja_source[0])
    assert f"cpt.data.val_ja_source, sft.data.val_ja_source {val_ja};" in outside, outside
    assert outside.endswith(f"(mounts: {root}:{root}, {root}/nemo_home:/root/.cache/nemo): jobs in the container "
                            "could not see them; mount each at its own path (HOST:HOST) or move it")
    checkout = Path(val_ja).parents[2]  # <checkout>/data/ja/x.jsonl (or resources/data/...)
    mounted = dataclasses.replace(profile, container_mounts=(*profile.container_mounts, f"{checkout}:{checkout}"))
    assert offline_problems(mounted, spec) == []
    away = offline_problems(mounted, _spec(root, f"model.name={model}", f"output_dir={tmp_path}/elsewhere"))
    # the run directory, once: its data/ (cpt.data.val_ja, ...) lies under it
    assert [p.split(" holds ")[1].split(" (mounts")[0] for p in away] == [f"output_dir {tmp_path}/elsewhere"]

    elsewhere = dataclasses.replace(mounted, container_mounts=(f"{root}/runs:/workspace/runs",
                                                               *mounted.container_mounts[1:]))
    (line,) = [p for p in offline_problems(elsewhere, spec) if "output_dir" in p]
    assert line == (f"{profile.path}: container_mounts: output_dir {root}/runs is mounted at /workspace/runs, not at "
                    f"its own path, and jobs open it as written: mount {root}/runs:{root}/runs")
    eval_data = offline_problems(mounted, _spec(root, f"model.name={model}", "eval.data_dir=/data/lm-eval"))
    assert [p.split(" (mounts")[0] for p in eval_data] == [
        f"{profile.path}: container_mounts: no mount's host side holds eval.data_dir /data/lm-eval"]


def test_a_cache_in_the_profiles_env_must_be_mounted_inside_the_container(tmp_path):
    model = _model_dir(tmp_path)
    profile = load_profile(str(_profile(tmp_path, container_mounts=[f"{tmp_path}:{tmp_path}", "/:/"])))
    spec = _spec(tmp_path, f"model.name={model}")
    assert offline_problems(profile, spec) == []
    unmounted = dataclasses.replace(profile, container_mounts=(f"{tmp_path}:{tmp_path}", f"{Path.cwd().anchor}usr:/usr"))
    cache = [p for p in offline_problems(unmounted, spec) if "env." in p]
    assert cache == [f"{profile.path}: env.NEMO_HOME /root/.cache/nemo is under no mount's container side "
                     f"({tmp_path}:{tmp_path}, /usr:/usr): what a job writes there is lost with its container; "
                     "mount a shared directory there"]


def test_the_launch_refuses_before_any_file_is_written_and_the_dry_run_warns(tmp_path, monkeypatch, capsys):
    import os
    import sys

    devnull = open(os.devnull)  # the dry run renders sbatch scripts through invoke, which reads stdin
    monkeypatch.setattr(sys, "stdin", devnull)
    monkeypatch.setattr(executors, "use_slurm_conf", lambda profile: None)  # no Slurm needed to be refused
    stub = tmp_path / "bin"  # were the check gone, the launch would reach sbatch: this one submits nothing
    stub.mkdir()
    (stub / "sbatch").write_text("#!/bin/sh\necho 'stub sbatch: the launch was not refused' >&2\nexit 97\n")
    (stub / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{stub}{os.pathsep}{os.environ['PATH']}")
    profile = _profile(tmp_path)
    values = load_preset("qwen25_500m_ja")
    overrides = [f"output_dir={tmp_path}/runs", "stages=[import]"]
    with pytest.raises(ProfileError, match=r"env\.HF_HUB_OFFLINE=1 .* model\.name is the hub name Qwen/Qwen2\.5-0\.5B"):
        launch(values, overrides, [], None, executor="slurm", profile=str(profile), dryrun=False, wait=False)
    assert not (tmp_path / "runs").exists()
    capsys.readouterr()
    assert launch(values, overrides, [], None, executor="slurm", profile=str(profile), dryrun=True, wait=False) == 0
    err = capsys.readouterr().err
    devnull.close()
    assert "warning: a launch would be refused: " in err and "env.HF_HUB_OFFLINE=1" in err
    assert "dpo.data" not in err  # a stage the run does not have reads nothing
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("fields, want", [
    ({}, {"partition": "batch", "time": "04:00:00", "gpus_per_node": 1, "exclusive": True, "mem": "0"}),  # as before
    ({"light_partition": "short", "light_gpus": 0, "light_time": "00:30:00", "light_exclusive": False,
      "light_mem": "32G"}, {"partition": "short", "time": "00:30:00", "gpus_per_node": None, "exclusive": None,
                            "mem": "32G"}),
])
def test_light_stages_ask_for_the_profiles_light_request_not_a_training_node(tmp_path, fields, want):
    profile = load_profile(str(_profile(tmp_path, time="04:00:00", **fields)))
    light = slurm_executor(profile, str(tmp_path), torchrun=False, gpus_per_node=1, light=True)
    assert {k: getattr(light, k) for k in want} == want
    training = slurm_executor(profile, str(tmp_path), torchrun=True, nodes=1, gpus_per_node=8)
    assert (training.partition, training.time, training.exclusive, training.mem) == ("batch", "04:00:00", True, "0")


def test_the_planner_gives_light_stages_the_light_request_and_hf_training_a_training_node(tmp_path):
    from jp_peft.run.plan import executor_factory, plan

    profile = load_profile(str(_profile(tmp_path, light_partition="short", light_exclusive=False)))
    tasks = plan(load_preset("qwen25_500m_ja"), [f"output_dir={tmp_path}/runs", "backend=hf", "stages=[import,cpt,eval]"],
                 [], dryrun=True)
    executor_for = executor_factory("slurm", profile, tmp_path)
    got = {t.stage: (executor_for(t).partition, executor_for(t).exclusive) for t in tasks}
    assert got == {"import": ("short", None), "cpt": ("batch", True), "eval": ("short", None)}


@pytest.mark.parametrize("field, value, message", [
    ("light_gpus", "one", "light_gpus must be a whole number, not 'one'"),
    ("light_gpus", 9, "light_gpus: 9 is not between 0 and gpus_per_node (8)"),
    ("light_exclusive", "no", "light_exclusive must be true or false, not 'no'"),
])
def test_a_bad_light_field_is_refused_naming_it(tmp_path, field, value, message):
    with pytest.raises(ProfileError, match=f": {re.escape(message)}$"):
        load_profile(str(_profile(tmp_path, **{field: value})))


def test_the_shipped_container_profile_mounts_its_paths_at_their_own_path():
    profile = load_profile("h100_pyxis")
    assert profile.light_exclusive is False and profile.light_gpus == 1
    for host, inside in (m.split(":")[:2] for m in profile.container_mounts):
        assert host == inside or inside == profile.env["NEMO_HOME"], (host, inside)


def test_a_setup_line_that_installs_at_job_start_is_refused_naming_it(tmp_path):
    """Jobs never install: an installer in setup or container_setup (what h100_pyxis.yaml ran in every job before
    its image was built once) is refused at plan time, naming the line; activating a built environment, or pip
    from a local wheel folder only (--no-index), passes. The shipped profiles install nothing."""
    from jp_peft.cluster.offline import install_problems

    model = _model_dir(tmp_path)
    old_pyxis = ('pip install -q -e /lustre/fsw/lab/jp-peft "torch==$(python -c "import torch; '
                 'print(torch.__version__)")"')
    profile = load_profile(str(_profile(tmp_path, container_mounts=[f"{tmp_path}:{tmp_path}", "/:/"],
                                        container_setup=[old_pyxis], setup=["module load cuda", "uv pip install x"])))
    problems = offline_problems(profile, _spec(tmp_path, f"model.name={model}"))
    assert [p.split(" installs packages")[0] for p in problems] == [
        f"{profile.path}: setup[1]: `uv pip install x`", f"{profile.path}: container_setup[0]: `{old_pyxis}`"]
    assert problems[0].endswith("build the environment once, on a machine with network, where every node reads it "
                                "(slurm/README.md: the environment, built once) and only activate it here")
    fine = dataclasses.replace(profile, setup=("source /shared/venv/bin/activate",),
                               container_setup=("pip install --no-index --find-links /shared/wheels jp-peft",))
    assert install_problems(fine) == []
    for name in ("h100_pyxis", "baremetal_venv", "local"):
        assert install_problems(load_profile(name)) == [], name


def test_a_container_run_on_megatron_needs_nemo_home_set(tmp_path):
    """The import stage writes the NeMo checkpoint under NEMO_HOME and the trained stages' jobs read it there: in a
    container its default (~/.cache/nemo inside it) is gone when the import job ends. The launcher passes the
    backend's shared_env (Megatron: NEMO_HOME; hf: none)."""
    from jp_peft.backends import backend_of

    model = _model_dir(tmp_path)
    profile = load_profile(str(_profile(tmp_path, container_mounts=[f"{tmp_path}:{tmp_path}", "/:/"],
                                        env={"HF_HUB_OFFLINE": "1"})))
    megatron = _spec(tmp_path, f"model.name={model}", "backend=megatron")
    hf = _spec(tmp_path, f"model.name={model}", "backend=hf")
    assert backend_of(megatron).shared_env == ("NEMO_HOME",) and backend_of(hf).shared_env == ()
    assert offline_problems(profile, megatron, backend_of(megatron).shared_env) == [
        f"{profile.path}: env.NEMO_HOME is not set: one job of this backend writes there and a later job reads it "
        "(the default lies inside the container, gone when its job ends); set env.NEMO_HOME to a mount's container side"]
    assert offline_problems(profile, hf, backend_of(hf).shared_env) == []
    bare = dataclasses.replace(profile, container_image=None, container_mounts=())
    assert offline_problems(bare, megatron, ("NEMO_HOME",)) == []  # bare metal: the nodes share the login's home
