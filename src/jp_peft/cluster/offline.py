"""What a job on a profile's compute nodes can reach, checked at plan time: offline nodes (a profile whose env
sets HF_HUB_OFFLINE) get no hub model name, and in a container profile every path a job reads or writes lies
under one of container_mounts, at the same path inside the container (jobs open the spec's paths as written).

Called by the launcher after planning and before anything is written: a launch is refused, a dry run warns.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from jp_peft.cluster.executors import SlurmProfile
from jp_peft.spec import ExperimentSpec, job_paths

TRUE_WORDS = ("1", "true", "yes", "on")
# Caches a job writes inside its container, when the profile's env points them somewhere: they must be mounted,
# or each job starts from an empty cache (NeMo's imported checkpoints under NEMO_HOME, the HF caches).
CACHE_ENV = ("NEMO_HOME", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "TRANSFORMERS_CACHE", "TORCH_HOME",
             "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "WANDB_DIR")


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


def offline_problems(profile: SlurmProfile, spec: ExperimentSpec) -> list[str]:
    """One line per thing a job of `spec` on `profile`'s nodes could not reach, naming the profile field and the
    spec field; [] when there is none."""
    problems = []
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
    for key in CACHE_ENV:
        value = profile.env.get(key)
        if value and "$" not in value and not any(_under(PurePosixPath(value), c) for _, c in pairs):
            problems.append(f"{profile.path}: env.{key} {value} is under no mount's container side ({listed}): "
                            "what a job writes there is lost with its container; mount a shared directory there")
    return problems


def check_offline(profile: SlurmProfile, specs: list[ExperimentSpec], dryrun: bool) -> None:
    """A launch whose jobs could not reach their model or paths is refused, one line each; a dry run (it submits
    nothing, and the paths may be fixed before the launch) shows the same lines as warnings."""
    import sys

    from jp_peft.cluster.executors import ProfileError

    problems = list(dict.fromkeys(line for spec in specs for line in offline_problems(profile, spec)))
    if problems and not dryrun:
        raise ProfileError("\n".join(problems))
    for line in problems:
        print(f"warning: a launch would be refused: {line}", file=sys.stderr)
