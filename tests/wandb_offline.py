"""Read a W&B offline run (`run-*.wandb`) back: run identity, config, metric definitions, history.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then
LevelDB-log framed chunks in 32 KiB blocks (crc32c, uint16 length, type FULL/FIRST/MIDDLE/LAST)
holding serialized `wandb_internal_pb2.Record`s. Parsed with W&B's own protobuf definitions;
used by the tests and by `jp-peft compare`, with no network.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _records(data: bytes):
    if data[:4] != b":W&B":
        raise ValueError("not a W&B transaction log")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def _item_key(item) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(run_dir: str | Path) -> dict[str, Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    files = sorted(Path(run_dir).glob("*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no .wandb file")
    out: dict[str, Any] = {"run": {}, "config": {}, "history": [], "summary": {}, "metrics": {}, "artifacts": []}
    for raw in _records(files[0].read_bytes()):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out["run"] = {"id": run.run_id, "project": run.project, "entity": run.entity, "group": run.run_group,
                          "job_type": run.job_type, "name": run.display_name, "tags": list(run.tags),
                          "git_commit": run.git.commit}
            for item in run.config.update:
                out["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][_item_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            out["metrics"][record.metric.name or record.metric.glob_name] = record.metric.step_metric
        elif kind == "artifact":
            out["artifacts"].append({"type": record.artifact.type, "name": record.artifact.name,
                                     "metadata": json.loads(record.artifact.metadata or "{}")})
    return out
