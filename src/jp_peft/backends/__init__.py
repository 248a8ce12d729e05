"""The training engines behind one protocol, and the registry that picks one by the spec's `backend`.

    backend = backend_of(spec)            # jp_peft.backends.megatron.MegatronBackend or .hf.HFBackend
    backend.validate(spec)                # plan time: what this engine cannot do, as a SpecError
    backend.composes(stage)               # whether a stage's task carries a composed NeMo recipe
    backend.launch_needs(spec, stage)     # processes and nodes a stage's task needs
    backend.import_model(spec, hf_dir, recipe) / train(spec, stage, recipe) / export(spec, stage)

This module and each backend's __init__ import nothing heavy (no torch, NeMo or transformers): the
planner, the CLI's choices and `--help` read the registry. The stage table (jp_peft.spec.stages) says
which stages each backend supports; a third backend is a package here and a line in IMPLEMENTATIONS.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from jp_peft.spec.stages import BACKEND_NAMES

if TYPE_CHECKING:
    from pathlib import Path

    from jp_peft.records.export_record import ExportRecord
    from jp_peft.records.metrics import StageMetrics
    from jp_peft.spec import ExperimentSpec

# name -> "module:class"; the names are the spec's `backend` choices (jp_peft.spec.stages.BACKEND_NAMES)
IMPLEMENTATIONS = {"megatron": "jp_peft.backends.megatron:MegatronBackend", "hf": "jp_peft.backends.hf:HFBackend"}
assert tuple(IMPLEMENTATIONS) == BACKEND_NAMES, "the registry and the spec's backend names must agree"


@dataclass(frozen=True)
class LaunchNeeds:
    """What a stage's task asks of its executor: nodes, processes per node, and whether those are ranks of
    one distributed job (torchrun on GPUs). `on_cpu`: NeMo's Megatron path on CPU (jp_peft.backends.megatron.cpu)."""

    nodes: int = 1
    processes_per_node: int = 1
    distributed: bool = False
    on_cpu: bool = False


ONE_PROCESS = LaunchNeeds()


class Backend:
    """The protocol every backend implements (defaults: what a backend without NeMo recipes does)."""

    name: str = ""
    # Environment variables naming a directory one job of this backend writes and a later job reads (Megatron:
    # NEMO_HOME, the imported NeMo checkpoint): a container profile must set each to a mounted directory.
    shared_env: tuple[str, ...] = ()

    def validate(self, spec: "ExperimentSpec") -> None:
        """Refuse, at plan time and naming the field, what this backend cannot run."""

    def composes(self, stage: str) -> bool:
        """Whether the stage's task carries a composed recipe (a NeMo recipe from jp_peft.recipes, nested in the
        NeMo-Run task and visible in --dryrun); the run layer composes it, since recipes sit above backends."""
        return False

    def local_overrides(self, smoke: bool, has_cuda: bool) -> list[str]:
        """Spec overrides a local launch on this machine implies (e.g. the CPU tier)."""
        return []

    def cannot_run_here(self, smoke: bool, has_cuda: bool) -> str | None:
        """Why a local launch of this backend cannot run on this machine (the message), or None."""
        return None

    def launch_needs(self, spec: "ExperimentSpec", stage: str) -> LaunchNeeds:
        return ONE_PROCESS

    def import_model(self, spec: "ExperimentSpec", hf_dir: str, recipe: Any) -> dict:
        """Extra facts for the import record (on Megatron: the NeMo checkpoint it made)."""
        return {}

    def train(self, spec: "ExperimentSpec", stage: str, recipe: Any) -> "StageMetrics":
        raise NotImplementedError

    def export(self, spec: "ExperimentSpec", stage: str) -> "ExportRecord":
        raise NotImplementedError

    def checkpoints(self, spec: "ExperimentSpec", stage: str) -> "Path":
        """Where a trained stage's trainer checkpoints live (what a resume reads)."""
        raise NotImplementedError


_LOADED: dict[str, Backend] = {}


def backend_of(spec_or_name) -> Backend:
    """The backend of a spec (or of a backend name)."""
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.backend
    if name not in _LOADED:
        if name not in IMPLEMENTATIONS:
            raise ValueError(f"backend: {name!r} is not one of {', '.join(IMPLEMENTATIONS)}")
        module, cls = IMPLEMENTATIONS[name].split(":")
        _LOADED[name] = getattr(importlib.import_module(module), cls)()
    return _LOADED[name]
