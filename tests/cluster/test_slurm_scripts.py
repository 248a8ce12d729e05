"""sbatch scripts NeMo-Run renders for the example profiles, compared with golden files.

Container (Pyxis) and bare-metal, 1 and 2 nodes, a sweep; the dependency graph is checked
beside them. Regenerate on purpose only: JP_PEFT_REGEN_GOLDEN=1 pytest tests/cluster/test_slurm_scripts.py
(that run writes the files and fails, by design; review `git diff tests/cluster/golden`, rerun without)
"""

import dataclasses
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jp_peft.cluster import executors
from jp_peft.cluster.executors import ProfileError, load_profile
from jp_peft.run.plan import plan
from jp_peft.run.dryrun import render_sbatch_scripts
from jp_peft.spec import load_preset

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden"  # tests/cluster/golden, beside this module
# No cluster needed: rendering is in process (unit); the cases that run a rendered job script or the
# launcher as subprocesses (stub sbatch/srun on PATH) are integration.
PREPARED = ["cpt.data.blend=[{name: ja, weight: 1.0, prefix: {ROOT}/data/ja_web_text_document}]",
            "cpt.data.val_ja={ROOT}/data/ja_val_text_document", "cpt.data.val_en={ROOT}/data/en_val_text_document",
            "sft.data.val_ja={ROOT}/data/ja_val_text_document", "sft.data.val_en={ROOT}/data/en_val_text_document",
            "sft.data.sft_train={ROOT}/data/ja_sft/training.jsonl"]
CASES = {
    # name: (preset, profile, overrides, sweep)
    "local_hf_sweep": ("smoke.yaml", "local", ["stages=[data,cpt,sft]"], ["lora.rank=8,16"]),
    "pyxis_2nodes": ("qwen25_500m_ja.yaml", "h100_pyxis",
                     ["stages=[cpt,export,sft]", "cluster.num_nodes=2", "cluster.gpus_per_node=8",
                      "train.global_batch_size=64", *PREPARED], []),
    "pyxis_headline": ("qwen25_500m_ja.yaml", "h100_pyxis", [], []),  # the README's --dryrun command
    "baremetal_1node": ("qwen25_500m_ja.yaml", "baremetal_venv",
                        ["stages=[cpt,sft]", "cluster.gpus_per_node=8", "train.global_batch_size=32", *PREPARED], []),
}


@pytest.fixture(autouse=True)
def real_stdin(monkeypatch):
    """NeMo-Run runs shell commands through invoke, which reads stdin: pytest's capture refuses that."""
    import sys

    with open(os.devnull) as devnull:
        monkeypatch.setattr(sys, "stdin", devnull)
        yield


def normalise(script: str, root: Path) -> str:
    script = script.replace(str(root), "<ROOT>").replace(str(REPO), "<REPO>")
    script = re.sub(r"--rdzv-id \d+", "--rdzv-id <RDZV>", script)  # random per render
    return re.sub(r"(\w+)_\d{15,}", r"\1_<ID>", script)


def render_case(name: str, root: Path, **profile_changes):
    preset, profile_name, overrides, sweep = CASES[name]
    return render(preset, load_profile(profile_name), overrides, sweep, root, **profile_changes)


def render(preset: str, profile, overrides: list[str], sweep: list[str], root: Path, **profile_changes):
    """Plan `preset` with `overrides` under `root` (with empty prepared data files) and render its scripts."""
    for prefix in ("ja_web", "ja_val", "en_val"):
        for ext in (".bin", ".idx"):
            (root / "data").mkdir(parents=True, exist_ok=True)
            (root / "data" / f"{prefix}_text_document{ext}").touch()
    (root / "data" / "ja_sft").mkdir(parents=True, exist_ok=True)
    (root / "data" / "ja_sft" / "training.jsonl").touch()
    if profile.tunnel.get("type") == "ssh":  # render here: the script is the same, no connection needed
        profile_changes.setdefault("tunnel", {"type": "local"})
    profile = dataclasses.replace(profile, **profile_changes)
    overrides = [o.replace("{ROOT}", str(root)) for o in overrides] + [f"output_dir={root / 'runs'}"]
    tasks = plan(load_preset(preset), overrides, sweep)
    return tasks, render_sbatch_scripts(tasks, profile)


@pytest.mark.unit
@pytest.mark.parametrize("case", sorted(CASES))
def test_sbatch_scripts_match_golden_files(case, tmp_path):
    tasks, scripts = render_case(case, tmp_path)
    assert set(scripts) == {t.name for t in tasks}
    regenerate = os.environ.get("JP_PEFT_REGEN_GOLDEN") == "1"  # exactly "1": "0" or "" compares
    for task in tasks:
        got = normalise(scripts[task.name], tmp_path)
        path = GOLDEN / case / f"{task.name}.sbatch"
        if regenerate:  # written, never compared with itself: a regenerating run cannot pass
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(got)
            continue
        assert path.exists(), f"no golden file {path}; regenerate with JP_PEFT_REGEN_GOLDEN=1"
        assert got == path.read_text(), f"{task.name}: rendered script differs from {path}"
    if regenerate:
        pytest.fail(f"regenerated {GOLDEN / case}: review the diff, then rerun without JP_PEFT_REGEN_GOLDEN")


@pytest.mark.unit
def test_scripts_carry_the_cluster_layout_and_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "fakekey-should-never-appear-0123456789")
    tasks, scripts = render_case("pyxis_2nodes", tmp_path)
    cpt = scripts["qwen_lora_ja-cpt"]
    assert "#SBATCH --nodes=2" in cpt and "#SBATCH --gpus-per-node=8" in cpt
    assert "--container-image /lustre/fsw/my_account/images/jp-peft-nemo26.02.sqsh" in cpt and "torchrun" in cpt
    assert "#SBATCH --requeue" in cpt and "#SBATCH --signal=USR1@300" in cpt
    assert 'read -r WANDB_API_KEY < "$HOME"/.config/jp-peft/wandb_key' in cpt  # read by the job at run time
    for script in scripts.values():
        assert "fakekey-should-never-appear" not in script
    deps = {t.name: t.depends_on for t in tasks}
    assert deps["qwen_lora_ja-export-cpt"] == ["qwen_lora_ja-cpt"]
    assert deps["qwen_lora_ja-sft"] == ["qwen_lora_ja-export-cpt"]


@pytest.mark.unit
def test_sweep_makes_one_chain_per_variant(tmp_path):
    tasks, _ = render_case("local_hf_sweep", tmp_path)
    deps = {t.name: t.depends_on for t in tasks}
    assert deps["smoke-rank8-cpt"] == ["smoke-data"] and deps["smoke-rank16-cpt"] == ["smoke-data"]
    assert deps["smoke-rank8-sft"] == ["smoke-rank8-cpt"]
    assert {t.spec.group_name for t in tasks} == {"smoke"}  # one W&B group for the comparison
    assert {t.spec.lora.rank for t in tasks if t.stage == "cpt"} == {8, 16}


@pytest.mark.unit
def test_profile_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("partition: gpu\n")
    with pytest.raises(ProfileError, match="required field 'account' is missing"):
        load_profile(str(bad))
    bad.write_text("account: a\npartition: gpu\nenv:\n  WANDB_API_KEY: abc\n")
    with pytest.raises(ProfileError, match="looks like a secret"):
        load_profile(str(bad))
    bad.write_text("account: a\npartition: gpu\ngpu_per_node: 8\n")
    with pytest.raises(ProfileError, match="unknown field 'gpu_per_node'"):
        load_profile(str(bad))
    bad.write_text("account: a\npartition: gpu\ncontainer_setup: [pip install x]\n")
    with pytest.raises(ProfileError, match="container_setup needs a container_image"):
        load_profile(str(bad))
    bad.write_text("account: a\npartition: gpu\nntasks_per_node: 8\n")
    with pytest.raises(ProfileError, match="ntasks_per_node is no longer a profile field"):
        load_profile(str(bad))
    bad.write_text("account: a\npartition: gpu\nenv:\n  NCCL_IB_HCA: mlx5_0 mlx5_1\n")
    with pytest.raises(ProfileError, match="env.NCCL_IB_HCA: 'mlx5_0 mlx5_1' is not a single shell word"):
        load_profile(str(bad))
    bad.write_text("account: a\npartition: gpu\nenv:\n  NCCL_IB_HCA: '\"mlx5_0 mlx5_1\"'\n  DATA: $HOME/d\n")
    assert load_profile(str(bad)).env == {"NCCL_IB_HCA": '"mlx5_0 mlx5_1"', "DATA": "$HOME/d"}


# --- what a rendered script does when bash runs it ------------------------------------------------

FAKE_KEY = "wandbkey-5f3c9a0e17d2b4c6-never-in-a-log"


def stub_slurm_commands(bin_dir: Path) -> None:
    """`scontrol` and `srun` for running a rendered script outside Slurm (the preamble asks for the nodes)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("scontrol", "echo node0"), ("srun", "echo 127.0.0.1")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)


def run_as_job(script: str, tmp_path: Path, env: dict[str, str], stage_command: str):
    """Run a rendered sbatch script with bash as Slurm would (its own `set -evx`, stdout and stderr into one
    log), with the stage's srun line replaced by `stage_command`."""
    lines = script.splitlines()
    stage = [i for i, line in enumerate(lines) if line.startswith("srun --output")]
    assert len(stage) == 1, script
    lines[stage[0]] = stage_command
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    (job / "script.sh").write_text("\n".join(lines) + "\n")
    stub_slurm_commands(tmp_path / "stubs")
    path = f"{tmp_path / 'stubs'}:{Path(sys.executable).parent}:/usr/bin:/bin"
    return subprocess.run(["bash", str(job / "script.sh")], cwd=job, capture_output=True, text=True, timeout=120,
                          env={"PATH": path, "SLURM_JOB_NODELIST": "node0", "SLURM_JOB_ID": "1", **env})


KEY_HASH_COMMAND = (f"{sys.executable} -c 'import hashlib, os; "
                    "print(\"stage sees key sha256\", hashlib.sha256(os.environ[\"WANDB_API_KEY\"].encode()).hexdigest())'")


@pytest.mark.integration
@pytest.mark.parametrize("key_path", ["~/.config/jp-peft/wandb_key", "{tmp}/secrets/wandb_key"])
def test_wandb_key_reaches_the_stage_but_never_the_job_log_script_or_configs(key_path, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)  # the key comes from the file only
    home = tmp_path / "home"
    key_file = Path(key_path.replace("~", str(home)).replace("{tmp}", str(tmp_path)))
    key_file.parent.mkdir(parents=True)
    key_file.write_text(FAKE_KEY + ("\n" if key_path.startswith("~") else ""))  # with and without a final newline
    key_file.chmod(0o600)
    _, scripts = render_case("local_hf_sweep", tmp_path, wandb_key_file=key_path.replace("{tmp}", str(tmp_path)),
                             setup=())
    script = scripts["smoke-rank8-cpt"]
    assert script.count("set -evx") == 1  # NeMo-Run's template traces every line it runs

    proc = run_as_job(script, tmp_path, {"HOME": str(home)}, KEY_HASH_COMMAND)

    log = proc.stdout + proc.stderr  # what Slurm writes to --output
    assert proc.returncode == 0, log
    assert f"stage sees key sha256 {hashlib.sha256(FAKE_KEY.encode()).hexdigest()}" in proc.stdout
    assert "+ export TOKENIZERS_PARALLELISM=false" in proc.stderr  # xtrace was on around the key
    assert FAKE_KEY not in log, "the W&B key is in the job log"
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and p != key_file and FAKE_KEY.encode() in p.read_bytes()]
    assert leaks == [], f"the W&B key was written to {leaks}"


# --- resources: light stages are one task, training is one torchrun per node with a process per GPU ---

def sbatch_value(script: str, option: str) -> str | None:
    found = re.search(rf"^#SBATCH --{option}=(\S+)$", script, flags=re.M)
    return found.group(1) if found else None


@pytest.mark.parametrize("overrides", [
    [],  # the README's headline command: --executor slurm --slurm-profile h100_pyxis --dryrun
    ["stages=[cpt,export,sft]", "cluster.num_nodes=2", "cluster.gpus_per_node=4", "train.global_batch_size=32",
     *PREPARED],
], ids=["headline", "2x4gpus"])
@pytest.mark.unit
def test_light_stages_run_one_task_and_torchrun_starts_one_process_per_allocated_gpu(overrides, tmp_path):
    tasks, scripts = render("qwen25_500m_ja.yaml", load_profile("h100_pyxis"), overrides, [], tmp_path)
    for task in tasks:
        script, cluster = scripts[task.name], task.spec.cluster
        stage_srun = next(line for line in script.splitlines() if line.startswith("srun --output"))
        assert sbatch_value(script, "ntasks-per-node") == "1", task.name
        if task.stage in ("cpt", "sft"):
            assert sbatch_value(script, "nodes") == str(cluster.num_nodes)
            assert sbatch_value(script, "gpus-per-node") == str(cluster.gpus_per_node)
            assert f"--nnodes {cluster.num_nodes} --nproc-per-node {cluster.gpus_per_node} " in stage_srun, task.name
        else:
            assert sbatch_value(script, "nodes") == "1" and sbatch_value(script, "gpus-per-node") == "1", task.name
            assert "torchrun" not in stage_srun and " python -m " in stage_srun, task.name


@pytest.mark.parametrize("ranks", [1, 2])
@pytest.mark.unit
def test_megatron_cpu_training_starts_a_torchrun_rank_per_gpus_per_node_without_a_gpu(ranks, tmp_path):
    """The Megatron CPU tier on the local profile (no GPUs): each of cluster.gpus_per_node is a gloo rank,
    started by torchrun in the node's one task, which asks for a CPU per rank; the light stages are unchanged."""
    tasks, scripts = render("smoke.yaml", load_profile("local"),
                            ["backend=megatron", "cluster.accelerator=cpu", f"cluster.gpus_per_node={ranks}",
                             "stages=[cpt,export,sft]", *PREPARED], [], tmp_path)
    assert {t.stage for t in tasks} >= {"cpt", "sft"}
    for task in tasks:
        script = scripts[task.name]
        stage_srun = next(line for line in script.splitlines() if line.startswith("srun --output"))
        assert sbatch_value(script, "ntasks-per-node") == "1" and sbatch_value(script, "nodes") == "1", task.name
        assert sbatch_value(script, "gpus-per-node") is None, task.name
        if task.stage in ("cpt", "sft"):
            assert f"--nnodes 1 --nproc-per-node {ranks} " in stage_srun, task.name
            assert sbatch_value(script, "cpus-per-task") == (str(ranks) if ranks > 1 else None), task.name
        else:
            assert "torchrun" not in stage_srun and sbatch_value(script, "cpus-per-task") is None, task.name


@pytest.mark.unit
def test_training_on_more_gpus_than_a_node_has_is_refused_before_submission(tmp_path):
    with pytest.raises(ProfileError, match=r"cluster.gpus_per_node=16 .*h100_pyxis.yaml .*gpus_per_node: 8"):
        render("qwen25_500m_ja.yaml", load_profile("h100_pyxis"),
               ["cluster.gpus_per_node=16", "train.global_batch_size=64"], [], tmp_path)
    with pytest.raises(ProfileError, match=r"local.yaml .* no GPUs"):
        render("qwen25_500m_ja.yaml", load_profile("local"), [], [], tmp_path)


# --- the NeMo stack: pinned in pyproject.toml, installed in the container, checked by every job ----

@pytest.mark.unit
def test_required_stack_is_what_pyproject_pins():
    import tomllib

    from packaging.requirements import Requirement

    pins = {Requirement(r).name: Requirement(r).specifier
            for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert set(executors.REQUIRED_STACK) == {"nemo_toolkit", "megatron-core"}
    for name, want in executors.REQUIRED_STACK.items():
        prefix = want[:-1] if want.endswith(".*") else None
        for candidate in ("2.7.2", "2.7.3", "2.7.4", "2.8.0", "0.14.2", "0.15.0", "0.15.3", "0.16.0"):
            accepted = candidate == want or bool(prefix and candidate.startswith(prefix))
            assert accepted == (candidate in pins[name]), (name, candidate)


def fake_distributions(root: Path, versions: dict[str, str]) -> Path:
    """A directory that, first on PYTHONPATH, makes importlib.metadata report these versions."""
    for name, version in versions.items():
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return root


STAGE_PROBE = "echo the stage ran"


@pytest.mark.integration
def test_every_job_prints_its_nemo_stack_and_stops_before_the_stage_when_it_is_not_the_pinned_one(tmp_path):
    _, scripts = render_case("local_hf_sweep", tmp_path, setup=())
    for name, script in scripts.items():  # every job: the same check, after the setup, before the stage
        check = script.find('print("jp-peft stack:')
        assert 0 < script.find("\n# setup\n") < check < script.find("\nsrun --output"), name

    good = run_as_job(scripts["smoke-rank8-cpt"], tmp_path, {}, STAGE_PROBE)
    assert good.returncode == 0, good.stdout + good.stderr
    assert re.search(r"^jp-peft stack: nemo_toolkit 2\.7\.3, megatron-core 0\.15\.\d+, nemo_run 0\.11\.1, torch ",
                     good.stdout, flags=re.M), good.stdout
    assert "the stage ran" in good.stdout

    old = fake_distributions(tmp_path / "old_stack", {"nemo_toolkit": "2.7.0", "megatron-core": "0.16.0"})
    bad = run_as_job(scripts["smoke-rank8-cpt"], tmp_path, {"PYTHONPATH": str(old)}, STAGE_PROBE)
    assert bad.returncode == 1
    assert ("jp-peft: this job runs nemo_toolkit 2.7.0 (need 2.7.3), megatron-core 0.16.0 (need 0.15.*); "
            "pyproject.toml pins them") in bad.stderr
    assert "the stage ran" not in bad.stdout


@pytest.mark.unit
def test_pyxis_jobs_run_the_image_built_once_install_nothing_and_check_their_stack_in_it(tmp_path):
    """The environment is built once (slurm/README.md): h100_pyxis names a squashfs image on the shared filesystem;
    its jobs install nothing (before, every job ran `pip install -e` in its container) and check the pinned stack
    inside the container, on every node, before the stage runs in that same container."""
    tasks, scripts = render_case("pyxis_headline", tmp_path)
    profile = load_profile("h100_pyxis")
    mounts = ",".join(profile.container_mounts)
    step = f"srun --ntasks-per-node=1 --container-image {profile.container_image} --container-name=jp-peft " \
           f"--container-mounts {mounts}"
    assert profile.container_image.endswith(".sqsh") and profile.container_setup == ()
    for task in tasks:
        lines = scripts[task.name].splitlines()
        assert not [line for line in lines if re.search(r"\b(pip|conda|apt-get|npm) ", line)], task.name
        check = next(i for i, line in enumerate(lines) if line.startswith(f"{step} python -c "))
        stage = next(i for i, line in enumerate(lines) if line.startswith("srun --output"))
        assert check < stage, task.name
        assert "--container-name=jp-peft " in lines[stage]  # the stage runs in the container checked above


# --- routine mistakes: exit 2 with one line ----------------------------------------------------------

EXPERIMENT = [sys.executable, str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "slurm", "--smoke",
              "--stages", "import"]


@pytest.mark.unit
@pytest.mark.parametrize("text", ["- account: a\n- partition: gpu\n", "gpu\n", "42\n", "account: [a\n"],
                         ids=["list", "word", "number", "not-yaml"])
def test_a_profile_that_is_not_a_mapping_is_refused_naming_the_file(text, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ProfileError, match=rf"^{re.escape(str(bad))}: .*mapping"):
        load_profile(str(bad))


@pytest.mark.integration
def test_a_list_profile_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- account: a\n- partition: gpu\n")
    proc = subprocess.run([*EXPERIMENT, "--slurm-profile", str(bad), "--dryrun", "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and str(bad) in proc.stderr, proc.stderr


def path_without_slurm(tmp_path: Path) -> str:
    """This interpreter's bin/ and the system's commands, but none of Slurm's."""
    bin_dir = tmp_path / "bin-without-slurm"
    bin_dir.mkdir()
    for system_dir in ("/usr/local/bin", "/usr/bin", "/bin"):
        for tool in Path(system_dir).iterdir() if Path(system_dir).is_dir() else ():
            if tool.name not in ("sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel", "salloc"):
                if not (bin_dir / tool.name).exists():
                    (bin_dir / tool.name).symlink_to(tool)
    return f"{Path(sys.executable).parent}:{bin_dir}"


@pytest.mark.integration
def test_slurm_without_sbatch_exits_2_naming_it_and_dryrun_still_works(tmp_path):
    env = {**os.environ, "PATH": path_without_slurm(tmp_path)}
    proc = subprocess.run([*EXPERIMENT, "--output-dir", str(tmp_path / "runs")], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and "sbatch" in proc.stderr, proc.stderr
    dry = subprocess.run([*EXPERIMENT, "--dryrun", "--verbose", "--output-dir", str(tmp_path / "runs")], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env=env)
    assert dry.returncode == 0 and "#SBATCH --job-name=jp-peft.smoke-import" in dry.stdout, dry.stderr[-2000:]


@pytest.mark.unit
def test_a_profiles_slurm_conf_is_what_every_slurm_command_of_the_launch_reads(tmp_path, monkeypatch):
    """local.yaml names the dev cluster's own config (not /etc/slurm's); the launcher exports it as SLURM_CONF,
    which its sbatch, scontrol and scancel and, through sbatch, the jobs read; an exported SLURM_CONF wins."""
    from jp_peft.cluster.executors import SlurmUnavailable, use_slurm_conf

    local = load_profile("local")
    assert local.slurm_conf == "/tmp/jp-peft-slurm-dev/slurm.conf"
    conf = tmp_path / "slurm.conf"
    profile = dataclasses.replace(local, slurm_conf=str(conf))
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sbatch").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bin" / "sbatch").chmod(0o755)
    monkeypatch.delenv("SLURM_CONF", raising=False)
    with pytest.raises(SlurmUnavailable, match=r"slurm_conf: .*slurm.conf does not exist; .*slurm/local/start.sh"):
        use_slurm_conf(profile)
    assert "SLURM_CONF" not in os.environ
    conf.write_text("ClusterName=x\n")
    use_slurm_conf(profile)
    assert os.environ["SLURM_CONF"] == str(conf)
    monkeypatch.setenv("SLURM_CONF", "/elsewhere/slurm.conf")
    use_slurm_conf(profile)
    assert os.environ["SLURM_CONF"] == "/elsewhere/slurm.conf"
    ssh = tmp_path / "ssh.yaml"
    ssh.write_text("account: a\npartition: p\nslurm_conf: /x/slurm.conf\n"
                   "tunnel: {type: ssh, host: h, user: u, job_dir: /j}\n")
    with pytest.raises(ProfileError, match="slurm_conf .* local tunnel"):
        load_profile(str(ssh))


@pytest.mark.unit
def test_sbatch_from_inside_a_job_keeps_the_clusters_slurm_conf(monkeypatch):
    from jp_peft.data.engine import _submitting_env

    monkeypatch.setenv("SLURM_CONF", "/tmp/jp-peft-slurm-dev/slurm.conf")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    with _submitting_env():
        assert "SLURM_ARRAY_TASK_ID" not in os.environ
        assert os.environ["SLURM_CONF"] == "/tmp/jp-peft-slurm-dev/slurm.conf"
    assert os.environ["SLURM_ARRAY_TASK_ID"] == "3"
