"""The machine and the software a run measures, and whether what each configuration imports is there.

The GPU image the device tool lends has torch, transformers 5, peft and lightning but none of NeMo,
megatron-core or nemo_run: bench/gpu/carry.sh downloads what a device run carries (bench/gpu/carry.txt).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata

from bench.gpu import REPO, BenchError

# What each configuration imports (module -> distribution), checked before anything runs.
NEEDED = {
    "megatron": {"nemo": "nemo_toolkit", "megatron.core": "megatron-core", "nemo_run": "nemo_run", "fiddle": "fiddle",
                 "lightning": "lightning", "transformers": "transformers", "peft": "peft"},
    "hf_backend": {"megatron.core": "megatron-core", "lightning": "lightning", "transformers": "transformers",
                   "peft": "peft"},
    "plain_hf_peft": {"megatron.core": "megatron-core", "transformers": "transformers", "peft": "peft"},
}
# The versions a results file records.
VERSIONED = ("torch", "nemo_toolkit", "megatron-core", "transformer_engine", "transformers", "peft", "lightning",
             "nemo_run", "numpy")


def gpu_info() -> dict:
    """nvidia-smi's name, driver and memory of GPU 0; {} without a GPU."""
    if shutil.which("nvidia-smi") is None:
        return {}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60, check=True).stdout.strip().splitlines()
    except (subprocess.SubprocessError, OSError):
        return {}
    if not out:
        return {}
    name, driver, memory = [x.strip() for x in out[0].split(",")]
    return {"gpu": name, "driver": driver, "gpu_memory": memory, "gpu_count": len(out)}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            **gpu_info()}


def versions() -> dict:
    found = {}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    try:
        found["jp_peft_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                                 timeout=30).stdout.strip() or None
    except OSError:
        found["jp_peft_commit"] = None
    # a copy of the tree without .git (the device tool's) says which commit it is through the environment
    found["jp_peft_commit"] = found["jp_peft_commit"] or os.environ.get("JP_PEFT_COMMIT")
    return found


def missing_modules(configs) -> list[str]:
    missing = set()
    for config in configs:
        for module, dist in NEEDED[config].items():
            try:
                if importlib.util.find_spec(module) is None:
                    missing.add(dist)
            except ModuleNotFoundError:
                missing.add(dist)
    return sorted(missing)


def require(configs, gpu: bool, timeout: float = 300.0) -> None:
    """Stop before anything runs where a configuration's packages, or the GPU, are not there. Presence
    alone is not enough on the device machine, where a carried package can lack one of its own imports:
    the modules are imported for real, in a child process (the parent stays free of NeMo and CUDA)."""
    missing = missing_modules(configs)
    if missing:
        raise BenchError(f"environment: not installed for {sys.executable}: {', '.join(missing)} (needed by "
                         f"{', '.join(configs)}; on the device machine carry bench/gpu/carry.sh's wheels, see --dryrun)")
    modules = sorted({m for c in configs for m in NEEDED[c]})
    if "megatron" in configs:
        modules.append("nemo.collections.llm")  # what the recipe imports: most of NeMo's dependencies
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)"
    proc = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BenchError(f"environment: importing {', '.join(modules)} failed: {last}")
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise BenchError("environment: no CUDA device: the GPU benchmark needs one (use --tiny on CPU)")
