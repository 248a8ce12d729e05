"""Shared fixtures. Tiers (pyproject markers): unit, integration, slurm, gpu (skipped without CUDA)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    has_cuda = shutil.which("nvidia-smi") is not None and Path("/dev/nvidiactl").exists()
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (NeMo Megatron path); none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The embedded tiny Qwen2 (built once per cache, like the smoke run does)."""
    from jp_peft.tiny import ensure_tiny_base

    return ensure_tiny_base()
