"""Fixed-length token blocks read from Megatron indexed datasets (through megatron.core's own reader).

Held-out evaluation on both backends reads the same blocks: the first `max_blocks` non-overlapping
seq_length+1 windows of the dataset's token stream, so every measurement of a model is comparable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset


def open_token_stream(prefix: str) -> np.ndarray:
    """All tokens of an indexed dataset, in document order, as a read-only memmap."""
    from jp_peft.data import indexed_dataset_module

    if not (Path(prefix + ".bin").exists() and Path(prefix + ".idx").exists()):
        raise FileNotFoundError(f"indexed dataset {prefix}.bin/.idx not found")
    dataset = indexed_dataset_module().IndexedDataset(prefix, mmap=True)  # validates the .idx header and sizes
    dtype = dataset.index.dtype
    total = int(np.sum(dataset.index.sequence_lengths, dtype=np.int64))
    return np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(total,))


class EvalBlocks(Dataset):
    """The first `max_blocks` non-overlapping blocks of a held-out stream: the same every time."""

    def __init__(self, prefix: str, seq_length: int, max_blocks: int):
        self.stream = open_token_stream(prefix)
        self.seq_length = seq_length
        self.n = min(max_blocks, (len(self.stream) - 1) // seq_length)
        if self.n < 1:
            raise ValueError(f"{prefix}: too few tokens for one validation block of {seq_length + 1}")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        start = i * self.seq_length
        tokens = torch.from_numpy(np.array(self.stream[start:start + self.seq_length + 1], dtype=np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}
