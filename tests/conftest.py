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


# The dev cluster's runtime directory (slurm/local/common.sh): its config, state, logs and pid files.
SLURM_DIR = Path(os.environ.get("JP_PEFT_SLURM_DIR", "/tmp/jp-peft-slurm-dev"))
CLUSTER_NODES = ["node1", "node2"]


@pytest.fixture(scope="session")
def cluster():
    """The dev Slurm cluster of slurm/local/ with two nodes (two slurmd on this host), installed and started
    once (root only). Its config is its own (SLURM_CONF, exported here for every Slurm command the tests and
    the launchers they start run); nothing under /etc/slurm is read or written."""
    import subprocess

    for script in (["install.sh"], ["start.sh", "--nodes", "2"]):
        proc = subprocess.run(["bash", str(REPO / "slurm/local" / script[0]), *script[1:]], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            if os.geteuid() != 0:
                pytest.skip(f"the local Slurm cluster needs root to install/start: {proc.stderr.strip()}")
            raise AssertionError(f"slurm/local/{script[0]} failed: {proc.stdout}{proc.stderr}")
    os.environ["SLURM_CONF"] = str(SLURM_DIR / "slurm.conf")
    return CLUSTER_NODES


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The embedded tiny Qwen2 (built once per cache, like the smoke run does)."""
    from jp_peft.tiny import ensure_tiny_base

    return ensure_tiny_base()


# The smoke run the integration tests share: short, but every stage, through the real CLI and
# NeMo-Run's local executor. A fake W&B key is in its environment (offline mode) so that tests
# can prove the key never lands in anything the run writes.
# Made per session: a key written in this file would be found in the run's copies of `git diff`
# (NeMo logs the checkout's diff into git-info.log) and prove nothing about the run itself.
FAKE_WANDB_KEY = "fakekey" + __import__("secrets").token_hex(17)


@pytest.fixture(scope="session")
def fake_wandb_key() -> str:
    return FAKE_WANDB_KEY
SMOKE_EVAL_LIMIT = 12  # items per task: enough for the checks, cheap enough for every smoke run in CI
SMOKE_OVERRIDES = ["cpt.train.max_steps=16", "cpt.train.val_check_interval=8", "cpt.train.limit_val_batches=4",
                   "sft.train.max_steps=10", "sft.train.val_check_interval=5", "sft.train.limit_val_batches=4",
                   f"eval.limit={SMOKE_EVAL_LIMIT}"]


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, tiny_base):
    import subprocess
    import time

    out = tmp_path_factory.mktemp("runs")
    env = {**os.environ, "WANDB_API_KEY": FAKE_WANDB_KEY, "WANDB_MODE": "offline"}
    started = time.perf_counter()
    proc = subprocess.run([PYTHON, str(REPO / "experiments/qwen_lora_ja.py"), "--executor", "local", "--smoke",
                           "--output-dir", str(out), *SMOKE_OVERRIDES], capture_output=True, text=True, timeout=900,
                          cwd=REPO, env=env)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out / "smoke", proc.stdout, wall


# The Megatron CPU tier's shared run (tests/test_megatron_cpu_smoke.py, tests/test_megatron_methods.py).
@pytest.fixture(scope="session")
def megatron_run(tmp_path_factory, tiny_base, fake_wandb_key):
    out = tmp_path_factory.mktemp("megatron_runs")
    env = {**os.environ, "WANDB_API_KEY": fake_wandb_key, "WANDB_MODE": "offline",
           "NEMO_HOME": str(tmp_path_factory.mktemp("nemo_home"))}
    from megatron_tier import MEGATRON_OVERRIDES, megatron_experiment

    proc = megatron_experiment("--output-dir", str(out), *MEGATRON_OVERRIDES, env=env)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return out / "smoke", proc.stdout, env
