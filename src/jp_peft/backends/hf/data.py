"""Datasets of the Hugging Face backend, read from the same prepared files as NeMo.

CPT reads Megatron indexed datasets (through megatron.core's own reader) as one token stream
per dataset, cut into seq_length+1 blocks and blended by weight the way Megatron's
BlendedDataset does: sample i goes to the dataset whose share lags its weight the most.
SFT reads the input/output JSONL and packs examples into seq_length bins with a
block-diagonal attention mask, so packed examples never attend to each other.

Sample i of a training set is a pure function of (i, seed): a resumed run that starts at
sample `global_step * global_batch_size` sees exactly the samples it would have seen.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from torch.utils.data import Dataset

from jp_peft.data.blocks import open_token_stream


def blend_schedule(weights: list[float], num_samples: int) -> np.ndarray:
    """Dataset index of each sample: greedy, so every prefix of the schedule matches the weights."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    counts = np.zeros(len(weights))
    out = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        choice = int(np.argmax(weights * (i + 1) - counts))
        out[i] = choice
        counts[choice] += 1
    return out


class BlendedBlocks(Dataset):
    """`num_samples` blocks of seq_length+1 tokens drawn from weighted token streams."""

    def __init__(self, prefixes: list[str], weights: list[float], seq_length: int, num_samples: int, seed: int):
        self.streams = [open_token_stream(p) for p in prefixes]
        self.seq_length = seq_length
        self.schedule = blend_schedule(weights, num_samples)
        self.block_orders = []
        for k, stream in enumerate(self.streams):
            n_blocks = (len(stream) - 1) // seq_length
            if n_blocks < 1:
                raise ValueError(f"{prefixes[k]}: {len(stream)} tokens, fewer than one block of {seq_length + 1}")
            self.block_orders.append(np.random.RandomState(seed + k).permutation(n_blocks))
        # position of sample i within its own dataset's sequence of draws
        self.rank_in_dataset = np.zeros(num_samples, dtype=np.int64)
        seen = np.zeros(len(prefixes), dtype=np.int64)
        for i, k in enumerate(self.schedule):
            self.rank_in_dataset[i] = seen[k]
            seen[k] += 1
        self.samples_per_dataset = seen

    def __len__(self) -> int:
        return len(self.schedule)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        k = int(self.schedule[i])
        order = self.block_orders[k]
        block = int(order[self.rank_in_dataset[i] % len(order)])  # cycles: another epoch of that dataset
        start = block * self.seq_length
        tokens = torch.from_numpy(np.array(self.streams[k][start:start + self.seq_length + 1], dtype=np.int64))
        return {"input_ids": tokens[:-1], "labels": tokens[1:]}

    def epochs(self) -> list[float]:
        return [float(n / len(o)) for n, o in zip(self.samples_per_dataset, self.block_orders)]


def load_sft_examples(path: str, tokenizer, seq_length: int) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per example; labels are -100 on the prompt (loss on the reply only)."""
    examples = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = tokenizer(row["input"], add_special_tokens=False)["input_ids"]
            reply = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
            ids = (prompt + reply)[: seq_length + 1]
            labels = ([-100] * len(prompt) + reply)[: seq_length + 1]
            if sum(1 for t in labels[1:] if t != -100) == 0:
                continue  # prompt alone fills the window: nothing to learn from this example
            examples.append((ids, labels))
    if not examples:
        raise ValueError(f"{path}: no usable SFT examples")
    return examples


def pack_examples(examples, seq_length: int) -> list[list[int]]:
    """First-fit bins of example indices whose shifted lengths fit seq_length."""
    bins: list[list[int]] = []
    space: list[int] = []
    for idx, (ids, _) in enumerate(examples):
        need = len(ids) - 1
        for b, free in enumerate(space):
            if need <= free:
                bins[b].append(idx)
                space[b] -= need
                break
        else:
            bins.append([idx])
            space.append(seq_length - need)
    return bins


class SFTDataset(Dataset):
    """Packed (or one-example-per-row) SFT samples; `num_samples` cycles over shuffled rows."""

    def __init__(self, path: str, tokenizer, seq_length: int, num_samples: int | None, seed: int, packing: bool,
                 pad_id: int):
        self.examples = load_sft_examples(path, tokenizer, seq_length)
        self.rows = pack_examples(self.examples, seq_length) if packing else [[i] for i in range(len(self.examples))]
        self.seq_length, self.pad_id = seq_length, pad_id
        self.num_samples = num_samples or len(self.rows)
        self.order = np.random.RandomState(seed).permutation(len(self.rows)) if num_samples else np.arange(len(self.rows))

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.rows[int(self.order[i % len(self.order)])]
        ids, labels, segments, positions = [], [], [], []
        for seg, idx in enumerate(row, start=1):
            ex_ids, ex_labels = self.examples[idx]
            ids += ex_ids[:-1]
            labels += ex_labels[1:]
            segments += [seg] * (len(ex_ids) - 1)
            positions += list(range(len(ex_ids) - 1))
        pad = self.seq_length - len(ids)
        return {
            "input_ids": torch.tensor(ids + [self.pad_id] * pad),
            "labels": torch.tensor(labels + [-100] * pad),
            "segment_ids": torch.tensor(segments + [0] * pad),
            "position_ids": torch.tensor(positions + [0] * pad),
        }

    def real_tokens(self) -> int:
        """Tokens that carry information per pass over the rows (for packing efficiency)."""
        return sum(len(self.examples[i][0]) - 1 for row in self.rows for i in row)


def packed_attention_mask(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4D mask [B, 1, L, L]: causal and within the same segment; padding attends to itself."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same & causal)[:, None]
    eye = torch.eye(length, dtype=torch.bool, device=segment_ids.device)[None, None]
    allowed = allowed | eye  # keeps padding rows finite (their labels are -100 anyway)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)
