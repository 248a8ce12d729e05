"""EvalBlocks (data/blocks.py) returns exactly the blocks the .bin/.idx files hold.

A tiny indexed dataset is written with megatron.core's own IndexedDatasetBuilder; the expected blocks
come from an independent reading of the files' raw bytes with numpy (the MMIDIDX layout: magic,
version, dtype code, counts, sequence lengths, byte pointers, document indices), not from jp-peft.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from jp_peft.data.blocks import EvalBlocks

pytestmark = pytest.mark.unit
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}


def read_raw(prefix: str) -> list[np.ndarray]:
    """The documents of an indexed dataset, from the bytes of its .idx and .bin."""
    idx = open(prefix + ".idx", "rb").read()
    assert idx[:9] == b"MMIDIDX\x00\x00"
    (version,), (code,) = struct.unpack_from("<Q", idx, 9), struct.unpack_from("<B", idx, 17)
    assert version == 1
    sequences, documents = struct.unpack_from("<QQ", idx, 18)
    offset = 34
    lengths = np.frombuffer(idx, dtype=np.int32, count=sequences, offset=offset)
    offset += 4 * sequences
    pointers = np.frombuffer(idx, dtype=np.int64, count=sequences, offset=offset)
    offset += 8 * sequences
    doc_index = np.frombuffer(idx, dtype=np.int64, count=documents, offset=offset)
    assert offset + 8 * documents == len(idx)
    assert doc_index[0] == 0 and doc_index[-1] == sequences
    data = open(prefix + ".bin", "rb").read()
    dtype = np.dtype(DTYPES[code])
    return [np.frombuffer(data, dtype=dtype, count=int(n), offset=int(p)) for n, p in zip(lengths, pointers)]


@pytest.fixture
def dataset(tmp_path):
    from jp_peft.data import indexed_dataset_module

    module = indexed_dataset_module()
    prefix = str(tmp_path / "val_text_document")
    rng = np.random.default_rng(7)
    docs = [rng.integers(0, 60000, size=n, dtype=np.int64) for n in (5, 17, 1, 40, 9, 23)]  # 95 tokens
    builder = module.IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.from_numpy(doc.astype(np.int64)))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    return prefix, docs


def test_the_raw_reading_is_what_was_written(dataset):
    prefix, docs = dataset
    raw = read_raw(prefix)
    assert [d.tolist() for d in raw] == [d.tolist() for d in docs]
    assert raw[0].dtype == np.uint16


@pytest.mark.parametrize("seq_length, max_blocks", [(8, 100), (8, 3), (10, 9), (94, 5)])
def test_eval_blocks_are_the_streams_first_windows(dataset, seq_length, max_blocks):
    prefix, _ = dataset
    stream = np.concatenate(read_raw(prefix)).astype(np.int64)  # 95 tokens in document order
    expected_n = min(max_blocks, (len(stream) - 1) // seq_length)
    blocks = EvalBlocks(prefix, seq_length, max_blocks)
    assert len(blocks) == expected_n
    for i in range(expected_n):
        window = stream[i * seq_length: i * seq_length + seq_length + 1]  # seq+1 tokens, sharing one with the next
        block = blocks[i]
        assert block["input_ids"].dtype == torch.int64
        assert block["input_ids"].tolist() == window[:-1].tolist()
        assert block["labels"].tolist() == window[1:].tolist()
    if (seq_length, max_blocks) == (8, 100):  # (95 - 1) // 8 = 11 blocks: the last is tokens 80..88
        assert len(blocks) == 11 and blocks[10]["labels"][-1].item() == stream[88]


def test_too_short_a_stream_is_refused(dataset):
    prefix, _ = dataset
    with pytest.raises(ValueError, match="too few tokens for one validation block of 96"):
        EvalBlocks(prefix, 95, 1)
