"""Executor factories: `local_executor(...)` and `slurm_executor(profile, ...)`.

Cluster profiles are YAML files under slurm/ (see slurm/README.md); a profile with a missing
or unknown field fails here, naming it, before anything is submitted. Every Slurm job prints
and checks its NeMo stack before its stage, and reads the W&B key where no trace can print it.

Just over 400 lines: a profile's fields, their checks and the executors built from them are one contract
(slurm/README.md's field table); what a profile's nodes can reach is apart (offline.py).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nemo_run as run

from jp_peft.pins import STACK
from jp_peft.resources import checkout_root, profile_dir

PROFILE_DIR = profile_dir()  # the bundled profiles (slurm/*.yaml in a checkout links to them)

# Environment every stage gets; no secret is ever put here (see `secret_setup_lines`).
BASE_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
# Common NCCL / torch settings for multi-node jobs (overridable in a profile's env).
MULTINODE_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_DEBUG": "WARN", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
# The NeMo stack every Slurm job checks before its stage (jp_peft.pins). NVIDIA's NeMo containers ship other
# versions (slurm/README.md).
REQUIRED_STACK = STACK
REPORTED_STACK = ("nemo_run", "torch", "transformers", "lightning")
# Pyxis keeps a named container on each node for the job's later steps: the stage runs where container_setup ran.
CONTAINER_NAME = "jp-peft"
# Run by the job's `python -c '...'`: no single quote in it.
STACK_CHECK = """import importlib.metadata as md, sys
def version(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
required, reported = {required}, {reported}
got = {{name: version(name) for name in [*required, *reported]}}
print("jp-peft stack: " + ", ".join(name + " " + v for name, v in got.items()) + ", python " + sys.version.split()[0])
wrong = [name + " " + got[name] + " (need " + want + ")" for name, want in required.items()
         if not (got[name] == want or want.endswith(".*") and got[name].startswith(want[:-1]))]
if wrong:
    sys.exit("jp-peft: this job runs " + ", ".join(wrong) + "; pyproject.toml pins them (slurm/README.md: NeMo stack)")"""


class ProfileError(ValueError):
    """A cluster profile is invalid; the message names the file and field."""


class SlurmUnavailable(ValueError):
    """Slurm's commands are not installed where jobs are submitted from."""


NO_SBATCH = ("--executor slurm submits jobs with Slurm's `sbatch`, which is not on PATH here: install Slurm's client "
             "commands (slurm/local/README.md for a dev cluster), submit from a login node, or use a profile with "
             "tunnel type ssh; --dryrun needs no Slurm")


@dataclass(kw_only=True)
class SubmittingLocalTunnel(run.LocalTunnel):
    """NeMo-Run's LocalTunnel (submit from this machine), saying in one line when `sbatch` is missing
    instead of invoke's traceback. Only submission needs it: --dryrun renders scripts without Slurm."""

    def run(self, command: str, hide: bool = True, warn: bool = False, **kwargs):
        if command.split(maxsplit=1)[:1] == ["sbatch"] and shutil.which("sbatch") is None:
            raise SlurmUnavailable(NO_SBATCH)
        return super().run(command, hide=hide, warn=warn, **kwargs)


def local_executor(devices: int = 1, torchrun: bool = False, env: dict[str, str] | None = None):
    keep_launch_dir_off_task_path()
    launcher = "torchrun" if torchrun else None
    # NeMo-Run starts local tasks as a bare `python -m ...` (or `torchrun`), resolved on PATH.
    # Put this interpreter's bin/ first so a task runs in the same venv as the launcher even
    # when the venv is not activated (CI calls .venv/bin/python directly); torchx prepends it.
    interpreter_bin = {"PATH": os.path.dirname(sys.executable)}
    return run.LocalExecutor(ntasks_per_node=devices, launcher=launcher,
                             env_vars={**BASE_ENV, **interpreter_bin, **(env or {})})


# Upstream adaptation, torchx 0.7.0 torchx/schedulers/local_scheduler.py (NeMo-Run's local executor
# runs tasks through it). `_to_popen_request` (:956-968) appends the launch directory
# (CWDImageProvider: os.getcwd()) to the task's PATH "so that the binaries in PATH precede over those
# in cwd", but `_get_replica_env` (:751) then puts that PATH *before* the inherited one: a `git` in
# the directory you launch from shadows /usr/bin/git (W&B runs git in every stage). An empty or
# relative entry in the launcher's PATH means the cwd as well. Tasks get neither.
TORCHX_LAUNCH_DIR_ON_PATH = 'role.env["PATH"] = _join_PATH(role.env.get("PATH"), cwd)'
TORCHX_TASK_PATH = 'env["PATH"] = _join_PATH(replica_params.env.get("PATH"), os.getenv("PATH"))'


def keep_launch_dir_off_task_path() -> None:
    import inspect

    from torchx.schedulers.local_scheduler import LocalScheduler

    upstream = LocalScheduler._get_replica_env
    if getattr(upstream, "keeps_launch_dir_off_path", False):
        return
    if (TORCHX_LAUNCH_DIR_ON_PATH not in inspect.getsource(LocalScheduler._to_popen_request)
            or TORCHX_TASK_PATH not in inspect.getsource(upstream)):
        raise RuntimeError("torchx's LocalScheduler no longer builds a task's PATH the way "
                           "jp_peft.cluster.executors.keep_launch_dir_off_task_path adapts: review that adaptation")

    def _get_replica_env(self, replica_params):
        env = upstream(self, replica_params)
        added_by_torchx = replica_params.env.get("PATH", "").split(os.pathsep)
        inherited = os.environ.get("PATH", "").split(os.pathsep)
        entries = [e for e in added_by_torchx if e != replica_params.cwd] + inherited
        env["PATH"] = os.pathsep.join(dict.fromkeys(e for e in entries if os.path.isabs(e)))
        return env

    _get_replica_env.keeps_launch_dir_off_path = True
    LocalScheduler._get_replica_env = _get_replica_env


@dataclass(frozen=True)
class SlurmProfile:
    """What a user writes in slurm/<name>.yaml."""

    path: str
    account: str
    partition: str
    time: str = "04:00:00"
    nodes: int = 1
    gpus_per_node: int = 8  # what a node has; training stages ask for the spec's cluster.gpus_per_node of them
    cpus_per_task: int | None = None
    qos: str | None = None
    exclusive: bool = False
    mem: str | None = None
    container_image: str | None = None
    container_mounts: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()  # run by the batch script, on the first node, outside any container
    container_setup: tuple[str, ...] = ()  # run inside the job's container on every node, before the stage
    requeue: bool = True
    signal_before_timelimit_s: int = 120
    wandb_key_file: str | None = None  # a file only the user can read; its contents never enter the script
    tunnel: dict[str, Any] = field(default_factory=lambda: {"type": "local"})
    # The cluster's slurm.conf, for a cluster whose commands do not find it by themselves (the dev cluster of
    # slurm/local/ keeps its own, not /etc/slurm's): see use_slurm_conf. A SLURM_CONF already set wins.
    slurm_conf: str | None = None
    # The light stages (import, data, export, eval: one process, at most one GPU) ask for these instead of a
    # training node; unset, each is the training field's value (partition, time, exclusive, mem) or, for
    # light_gpus, one GPU where nodes have them.
    light_partition: str | None = None
    light_gpus: int | None = None
    light_time: str | None = None
    light_exclusive: bool | None = None
    light_mem: str | None = None

    REQUIRED = ("account", "partition")

    def light_request(self) -> dict[str, Any]:
        """partition, gpus, time, exclusive, mem of a light stage's job."""
        pick = lambda light, default: default if light is None else light  # noqa: E731
        return {"partition": pick(self.light_partition, self.partition),
                "gpus": pick(self.light_gpus, min(self.gpus_per_node, 1)),
                "time": pick(self.light_time, self.time),
                "exclusive": pick(self.light_exclusive, self.exclusive),
                "mem": pick(self.light_mem, self.mem)}


# The example values the bundled site profiles ship with (h100_pyxis, baremetal_venv): a job submitted with
# one of them fails in Slurm (an unknown account) or, worse, mounts or logs in somewhere that is not the site's
PLACEHOLDERS = ("my_account", "myname", "cluster.example")


def placeholder_fields(profile: SlurmProfile) -> list[str]:
    """`field: value` for every profile field (list entries and mapping values included) that still holds
    one of PLACEHOLDERS."""
    found = []
    for name in sorted(set(SlurmProfile.__dataclass_fields__) - {"path"}):
        value = getattr(profile, name)
        items = (value.items() if isinstance(value, dict)
                 else ((f"[{i}]", v) for i, v in enumerate(value)) if isinstance(value, (list, tuple))
                 else [("", value)])
        for key, item in items:
            if isinstance(item, str) and any(marker in item for marker in PLACEHOLDERS):
                label = f"{name}.{key}" if isinstance(value, dict) else f"{name}{key}"
                found.append(f"{label}: {item}")
    return found


def check_placeholders(profile: SlurmProfile, dryrun: bool) -> None:
    """A launch with a profile that still holds example values is refused, naming each field; a dry run
    (it submits nothing) shows the same lines as a warning."""
    found = placeholder_fields(profile)
    if found and not dryrun:
        raise ProfileError(f"{profile.path}: still holds the example profile's placeholder values; set them for "
                           f"your site (or copy it and pass --slurm-profile PATH): " + "; ".join(found))
    for line in found:
        print(f"warning: a launch would be refused: {profile.path}: placeholder value {line}", file=sys.stderr)


def load_profile(name_or_path: str) -> SlurmProfile:
    import yaml

    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))
        raise ProfileError(f"slurm profile {name_or_path!r} not found (known: {', '.join(known)})")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ProfileError(f"{path}: not a YAML mapping of profile fields: {getattr(exc, 'problem', exc)}{where}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ProfileError(f"{path}: a profile is a mapping of fields (account: ..., partition: ...), "
                           f"not a {type(values).__name__}")
    fields = set(SlurmProfile.__dataclass_fields__) - {"path"}
    if "ntasks_per_node" in values:
        raise ProfileError(f"{path}: ntasks_per_node is no longer a profile field: each stage gets the tasks it needs "
                           "(one for import/data/export/eval, one torchrun per node with a process per GPU for "
                           "training); remove it")
    for key in values:
        if key not in fields:
            raise ProfileError(f"{path}: unknown field {key!r}; known: {', '.join(sorted(fields))}")
    for key, kind in (("env", dict), ("tunnel", dict), ("container_mounts", list), ("setup", list),
                      ("container_setup", list), ("light_gpus", int), ("light_exclusive", bool)):
        if values.get(key) is not None and not isinstance(values[key], kind):
            what = {dict: "a mapping", list: "a list", int: "a whole number", bool: "true or false"}[kind]
            raise ProfileError(f"{path}: {key} must be {what}, not {values[key]!r}")
    if values.get("light_gpus") is not None and not 0 <= values["light_gpus"] <= values.get("gpus_per_node", 8):
        raise ProfileError(f"{path}: light_gpus: {values['light_gpus']} is not between 0 and gpus_per_node "
                           f"({values.get('gpus_per_node', 8)})")
    for key in SlurmProfile.REQUIRED:
        if values.get(key) in (None, ""):
            raise ProfileError(f"{path}: required field {key!r} is missing")
    tunnel = values["tunnel"] = values.get("tunnel") or {"type": "local"}
    if tunnel.get("type") not in ("local", "ssh"):
        raise ProfileError(f"{path}: tunnel.type must be 'local' or 'ssh'")
    if tunnel["type"] == "ssh":
        for key in ("host", "user", "job_dir"):
            if not tunnel.get(key):
                raise ProfileError(f"{path}: tunnel.{key} is required for an ssh tunnel")
    if values.get("slurm_conf") and tunnel["type"] != "local":
        raise ProfileError(f"{path}: slurm_conf names this machine's config for a local tunnel; over ssh, set "
                           "SLURM_CONF on the login node")
    if values.get("container_setup") and not values.get("container_image"):
        raise ProfileError(f"{path}: container_setup needs a container_image (use setup on bare metal)")
    # {repo}: the checkout jp-peft runs from (e.g. `source {repo}/.venv/bin/activate`), which a wheel has not
    uses_repo = [key for key in ("container_mounts", "setup", "container_setup")
                 if any("{repo}" in str(v) for v in values.get(key) or ())]
    repo = checkout_root()
    if uses_repo and repo is None:
        raise ProfileError(f"{path}: {uses_repo[0]} uses {{repo}}, the checkout jp-peft runs from, but this jp-peft "
                           "is installed, not run from a checkout; write the path out")
    for key in ("container_mounts", "setup", "container_setup"):
        values[key] = tuple(str(v).replace("{repo}", str(repo)) for v in (values.get(key) or ()))
    for key in ("env",):
        values[key] = {str(k): str(v) for k, v in (values.get(key) or {}).items()}
        for env_key in values[key]:
            if "KEY" in env_key.upper() or "TOKEN" in env_key.upper() or "SECRET" in env_key.upper():
                raise ProfileError(f"{path}: env.{env_key} looks like a secret; profiles must not hold secrets "
                                   "(use wandb_key_file or the submitting environment)")
            # NeMo-Run writes `export KEY=value` unquoted into the sbatch script (so $VARS expand);
            # a value that is not one shell word would silently export something else.
            value = values[key][env_key]
            try:
                single_word = len(shlex.split(value)) == 1 and "\n" not in value
            except ValueError:
                single_word = False
            if not single_word:
                raise ProfileError(f"{path}: env.{env_key}: {value!r} is not a single shell word; sbatch scripts "
                                   f"export it unquoted, so quote it inside the value, e.g. '\"{value}\"'")
    return SlurmProfile(path=str(path), **values)


def use_slurm_conf(profile: SlurmProfile) -> None:
    """Point every Slurm command this process starts at the profile's cluster: the launcher's sbatch (NeMo-Run's
    tunnel), scontrol, squeue and scancel read SLURM_CONF, and the jobs inherit it (sbatch exports the submitting
    environment), so their srun and scontrol talk to the same cluster. An exported SLURM_CONF is the user's
    choice and is kept. Called before anything is planned or written: a missing sbatch or config is refused here."""
    if profile.tunnel.get("type", "local") == "local" and shutil.which("sbatch") is None:
        raise SlurmUnavailable(NO_SBATCH)
    if profile.slurm_conf and "SLURM_CONF" not in os.environ:
        if not Path(profile.slurm_conf).is_file():
            raise SlurmUnavailable(f"{profile.path}: slurm_conf: {profile.slurm_conf} does not exist; for the dev "
                                   "cluster, start it first: bash slurm/local/start.sh (slurm/local/README.md)")
        os.environ["SLURM_CONF"] = profile.slurm_conf


def check_training_fits(profile: SlurmProfile, gpus: int) -> None:
    """A torchrun stage on this profile's nodes: refuse, before submission, what Slurm could never schedule."""
    if gpus < 1 or profile.gpus_per_node < 1:
        raise ProfileError(f"{profile.path} describes nodes with no GPUs (gpus_per_node: {profile.gpus_per_node}): "
                           "the megatron backend trains with torchrun on GPUs; use a GPU profile or --backend hf")
    if gpus > profile.gpus_per_node:
        raise ProfileError(f"cluster.gpus_per_node={gpus} asks for more GPUs than a node of {profile.path} has "
                           f"(gpus_per_node: {profile.gpus_per_node})")


def stack_check_command() -> str:
    """Print the versions the job runs; exit 1, naming what is wrong, unless they are REQUIRED_STACK."""
    return "python -c '" + STACK_CHECK.format(required=json.dumps(REQUIRED_STACK),
                                             reported=json.dumps(REPORTED_STACK)) + "'"


def stack_setup_lines(profile: SlurmProfile) -> list[str]:
    """Prepare and check the stack before the stage. The batch script runs outside the container,
    so with Pyxis both happen in a job step, one task per node, in the named container that the
    stage's step then reuses. `|| exit 1`: NeMo-Run's script runs its setup under `set +e`."""
    if not profile.container_image:
        return [f"{stack_check_command()} || exit 1"]
    args = ["srun", "--ntasks-per-node=1", "--container-image", profile.container_image,
            f"--container-name={CONTAINER_NAME}"]
    if profile.container_mounts:
        args += ["--container-mounts", ",".join(profile.container_mounts)]
    step = " ".join(shlex.quote(arg) for arg in args)
    lines = []
    if profile.container_setup:
        lines.append(f"{step} bash -ec {shlex.quote(chr(10).join(profile.container_setup))} || exit 1")
    lines.append(f"{step} {stack_check_command()} || exit 1")
    return lines


def secret_setup_lines(profile: SlurmProfile) -> list[str]:
    """Bring WANDB_API_KEY into the job without writing it into the script.

    Slurm exports the submitting environment to the job by default, so a key exported at
    submission time arrives by itself; a key file is read at run time by the job.

    NeMo-Run's script runs under `set -evx`, and xtrace prints every expanded word, so an
    assignment from `$(cat FILE)` would print the key into the job log. `read` takes the key
    from stdin instead: the trace shows `+ read -r WANDB_API_KEY` and `+ export WANDB_API_KEY`,
    never the value. No later line of the script may expand `$WANDB_API_KEY`.
    """
    if not profile.wandb_key_file:
        return []
    path = profile.wandb_key_file
    # "~/x" must expand in the job, on the compute node: written as "$HOME/x" inside double quotes.
    path = '"$HOME"/' + shlex.quote(path[2:]) if path.startswith("~/") else shlex.quote(path)
    return [f"if [ -r {path} ]; then read -r WANDB_API_KEY < {path} || true; export WANDB_API_KEY; fi"]


def slurm_executor(profile: SlurmProfile, job_dir: str, torchrun: bool, nodes: int | None = None,
                   gpus_per_node: int | None = None, env: dict[str, str] | None = None, on_cpu: bool = False,
                   light: bool = False):
    """A NeMo-Run SlurmExecutor for one stage. `job_dir` must be the experiment's base_dir
    (NeMo-Run writes the sbatch script under base_dir and submits it from the tunnel's job_dir:
    when they differ, sbatch cannot open the script — NeMo-Run issue 299).

    torchrun (Megatron training): `nodes` x `gpus_per_node` GPUs, one Slurm task per node, in which
    torchrun starts one process per allocated GPU. Otherwise (import, data, export, eval, hf
    training) one task on one node with at most one GPU: every extra task would run the whole
    stage again over the same files. on_cpu (the Megatron CPU tier, the tiny model): the same layout, one task
    per node (`nodes`, default 1) in which torchrun starts `gpus_per_node` gloo ranks (default 1), but no GPU
    request; the task asks for a CPU per rank (or the profile's cpus_per_task, if more), so that a node
    holds its ranks and a site binding tasks to their CPUs does not put them all on one core.
    light (import, data, export, eval): one task on the profile's light_* request (`light_request`), not a
    training node; `gpus_per_node` is then ignored.
    """
    nprocs = None
    cpus_per_task = profile.cpus_per_task
    request = {"partition": profile.partition, "time": profile.time, "exclusive": profile.exclusive, "mem": profile.mem}
    if light:
        request = profile.light_request()
        gpus_per_node = request.pop("gpus")
    if torchrun and on_cpu:
        nodes, gpus, nprocs = nodes or 1, 0, gpus_per_node or 1
        if nprocs > 1:
            cpus_per_task = max(cpus_per_task or 1, nprocs)
    elif torchrun:
        nodes = nodes or profile.nodes
        gpus = profile.gpus_per_node if gpus_per_node is None else gpus_per_node
        check_training_fits(profile, gpus)
        nprocs = gpus
    else:
        nodes = 1
        gpus = min(profile.gpus_per_node if gpus_per_node is None else gpus_per_node, 1)
    tunnel_cfg = profile.tunnel
    if tunnel_cfg.get("type", "local") == "ssh":
        identity = tunnel_cfg.get("identity")
        tunnel = run.SSHTunnel(host=tunnel_cfg["host"], user=tunnel_cfg["user"], job_dir=tunnel_cfg["job_dir"],
                               identity=os.path.expanduser(identity) if identity else None)
    else:
        tunnel = SubmittingLocalTunnel(job_dir=job_dir)
    env_vars = {**BASE_ENV, **(MULTINODE_ENV if nodes > 1 else {}), **profile.env, **(env or {})}
    additional: dict[str, Any] = {}
    if profile.requeue:
        additional["requeue"] = True
    setup = [*profile.setup, *stack_setup_lines(profile), *secret_setup_lines(profile)]
    executor = run.SlurmExecutor(
        account=profile.account,
        partition=request["partition"],
        time=request["time"],
        nodes=nodes,
        ntasks_per_node=1,
        # NeMo-Run's default is ntasks_per_node: the count of torchrun's processes must follow the GPUs instead.
        torchrun_nproc_per_node=nprocs,
        gpus_per_node=gpus or None,
        cpus_per_task=cpus_per_task,
        qos=profile.qos,
        mem=request["mem"],
        exclusive=request["exclusive"] or None,
        container_image=profile.container_image,
        container_mounts=list(profile.container_mounts),
        signal=f"USR1@{profile.signal_before_timelimit_s}" if profile.signal_before_timelimit_s else None,
        additional_parameters=additional or None,
        srun_args=[f"--container-name={CONTAINER_NAME}"] if profile.container_image else None,
        setup_lines="\n".join(setup) if setup else None,
        env_vars=env_vars,
        tunnel=tunnel,
        packager=run.Packager(),
        job_name_prefix="jp-peft.",
    )
    if torchrun:
        executor.launcher = "torchrun"
    return executor
