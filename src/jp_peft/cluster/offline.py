"""What a job on a profile's compute nodes can reach, checked at plan time: offline nodes (a profile whose env
sets HF_HUB_OFFLINE) get no hub model name, and in a container profile every path a job reads or writes lies
under one of container_mounts, at the same path inside the container (jobs open the spec's paths as written).
Jobs never install: a profile whose setup or container_setup runs an installer (pip, uv, conda, apt, npm) is
refused, pointing at the environment built once (slurm/README.md); and in a container the directories a backend
hands from job to job (Megatron: NEMO_HOME, where the import stage writes the NeMo checkpoint) must be set in env.

Called by the launcher after planning and before anything is written: a launch is refused, a dry run warns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import PurePosixPath

from jp_peft.cluster.executors import SlurmProfile
from jp_peft.spec import ExperimentSpec, job_paths

TRUE_WORDS = ("1", "true", "yes", "on")
# Caches a job writes inside its container, when the profile's env points them somewhere: they must be mounted,
# or each job starts from an empty cache (NeMo's imported checkpoints under NEMO_HOME, the HF caches).
CACHE_ENV = ("NEMO_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME",
             "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "WANDB_DIR")


# A command that installs packages: at job start that reaches the network (which offline compute nodes do not)
# and may resolve differently on each node. pip with --no-index (a local wheel folder) installs nothing new.
INSTALLER = re.compile(r"\b(?:(?:pip3?|uv\s+pip|python3?\s+-m\s+pip)\s+install|(?:conda|mamba|micromamba)\s+"
                       r"(?:install|create)|apt(?:-get)?\s+install|npm\s+(?:install|ci))\b")
BUILD_ONCE = ("build the environment once, on a machine with network, where every node reads it (slurm/README.md: "
              "the environment, built once) and only activate it here")


def hub_offline(profile: SlurmProfile) -> bool:
    return profile.env.get("HF_HUB_OFFLINE", "").strip('"\'').lower() in TRUE_WORDS


def mounts(profile: SlurmProfile) -> list[tuple[PurePosixPath, PurePosixPath]]:
    """(host side, container side) of each container_mounts entry (`HOST[:CONTAINER[:FLAGS]]`)."""
    pairs = []
    for entry in profile.container_mounts:
        host, _, rest = entry.partition(":")
        inside = rest.split(":", 1)[0] or host
        pairs.append((PurePosixPath(host), PurePosixPath(inside)))
    return pairs


def _under(path: PurePosixPath, root: PurePosixPath) -> bool:
    return path == root or root in path.parents


def offline_problems(profile: SlurmProfile, spec: ExperimentSpec, shared_env: tuple[str, ...] = ()) -> list[str]:
    """One line per thing a job of `spec` on `profile`'s nodes could not reach, naming the profile field and the
    spec field; [] when there is none. `shared_env`: the variables naming a directory the spec's backend hands from
    job to job (its Backend.shared_env: NEMO_HOME on Megatron), which a container profile must set."""
    problems = install_problems(profile)
    if hub_offline(profile) and spec.local_model_dir() is None and not spec.model.tiny:
        problems.append(
            f"{profile.path}: env.HF_HUB_OFFLINE={profile.env['HF_HUB_OFFLINE']} (compute nodes without hub access) "
            f"but model.name is the hub name {spec.model.name}: download it once (`hf download {spec.model.name} "
            "--local-dir DIR`, DIR on the shared filesystem) and pass --hf-model DIR (model.name=DIR)")
    if not profile.container_image:
        return problems  # bare metal: the nodes see the paths the login node sees (a shared filesystem)
    pairs = mounts(profile)
    listed = ", ".join(profile.container_mounts) or "none"
    unmounted: dict[PurePosixPath, list[str]] = {}  # path -> its fields; one line for all of them
    for field_name, raw in job_paths(spec):
        path = PurePosixPath(raw)
        mount = next(((h, c) for h, c in pairs if _under(path, h)), None)
        if mount is None:
            # a path under one already named (the run directory's data/ under output_dir) adds nothing
            if not any(_under(path, known) for known in unmounted if known != path):
                unmounted.setdefault(path, []).append(field_name)
        elif mount[0] != mount[1]:
            problems.append(f"{profile.path}: container_mounts: {field_name} {raw} is mounted at {mount[1]}, not at "
                            f"its own path, and jobs open it as written: mount {mount[0]}:{mount[0]}")
    if unmounted:
        named = "; ".join(f"{', '.join(fields)} {path}" for path, fields in unmounted.items())
        problems.append(f"{profile.path}: container_mounts: no mount's host side holds {named} (mounts: {listed}): "
                        "jobs in the container could not see them; mount each at its own path (HOST:HOST) or move it")
    for key in shared_env:
        if not profile.env.get(key):
            problems.append(f"{profile.path}: env.{key} is not set: one job of this backend writes there and a later "
                            "job reads it (the default lies inside the container, gone when its job ends); set "
                            f"env.{key} to a mount's container side")
    for key in CACHE_ENV:
        value = profile.env.get(key)
        if value and "$" not in value and not any(_under(PurePosixPath(value), c) for _, c in pairs):
            problems.append(f"{profile.path}: env.{key} {value} is under no mount's container side ({listed}): "
                            "what a job writes there is lost with its container; mount a shared directory there")
    return problems


def install_problems(profile: SlurmProfile) -> list[str]:
    """One line per setup or container_setup line that installs packages at job start."""
    lines = []
    for field_name in ("setup", "container_setup"):
        for i, command in enumerate(getattr(profile, field_name)):
            if INSTALLER.search(command) and "--no-index" not in command:
                lines.append(f"{profile.path}: {field_name}[{i}]: `{command}` installs packages when each job "
                             f"starts (from the network, which compute nodes may not reach, and per node): {BUILD_ONCE}")
    return lines


def check_offline(profile: SlurmProfile, specs: list[ExperimentSpec], dryrun: bool,
                  shared_env_of: Callable[[ExperimentSpec], tuple[str, ...]] = lambda spec: ()) -> None:
    """A launch whose jobs could not reach their model or paths is refused, one line each; a dry run (it submits
    nothing, and the paths may be fixed before the launch) shows the same lines as warnings."""
    import sys

    from jp_peft.cluster.executors import ProfileError

    problems = list(dict.fromkeys(line for spec in specs for line in offline_problems(profile, spec, shared_env_of(spec))))
    if problems and not dryrun:
        raise ProfileError("\n".join(problems))
    for line in problems:
        print(f"warning: a launch would be refused: {line}", file=sys.stderr)
