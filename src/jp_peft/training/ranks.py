"""Which process of a multi-rank stage this is, and the one place a stage waits for all of them.

A stage with several ranks (torchrun on GPUs, or gloo ranks on CPU) runs the same code in every process;
records are written once, by rank 0, after every rank has finished (a rank that failed after rank 0 wrote
metrics.json would otherwise leave a record that says the stage is done). The rank comes from the
launcher's environment (torchrun's RANK; Slurm's SLURM_PROCID where srun starts the ranks), so it is
known before and after torch.distributed is set up.
"""

from __future__ import annotations

import os


def global_rank() -> int:
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_rank_zero() -> bool:
    return global_rank() == 0


def placement() -> str | None:
    """Where this rank runs, from the launcher's environment ("rank 1/2 on node2, node rank 1, local rank 0"),
    or None for a one-process stage. Every rank prints it at the start of a stage, so a log shows which node
    each rank of a multi-node job ran on (Slurm's SLURMD_NODENAME: on the dev cluster both nodes share one
    host name)."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) <= 1:
        return None
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    return (f"rank {global_rank()}/{world} on {node}, node rank {os.environ.get('GROUP_RANK', '0')}, "
            f"local rank {os.environ.get('LOCAL_RANK', '0')}")


def several_ranks() -> bool:
    """Whether a process group of more than one rank is up (torch.distributed, once the trainer set it up)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wait_for_all_ranks() -> None:
    """A barrier across the stage's ranks, where a process group is up (nothing to wait for otherwise)."""
    if several_ranks():
        import torch.distributed as dist

        dist.barrier()
