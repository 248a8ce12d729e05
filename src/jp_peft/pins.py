"""The NeMo stack jp-peft is pinned to, in one place.

pyproject.toml says the same in its dependencies (tests/run/test_slurm_scripts.py keeps the two in step): every
Slurm job checks that it runs these versions (jp_peft.cluster.executors), and the Megatron CPU adaptations
refuse any other (jp_peft.backends.megatron.cpu), since their upstream line numbers and hashes are these
releases'.
"""

# version of each distribution; "0.15.*" is any 0.15 release
STACK = {"nemo_toolkit": "2.7.3", "megatron-core": "0.15.*"}


def matches(installed: str, wanted: str) -> bool:
    return installed == wanted or (wanted.endswith(".*") and installed.startswith(wanted[:-1]))
