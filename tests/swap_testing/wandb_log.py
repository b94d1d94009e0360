"""What an offline wandb run logged, read back from its ``run-<id>.wandb`` file (wandb has no reader for it)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# The file is a LevelDB-style log after a 7-byte header: 32 KiB blocks of chunks, each with a 7-byte header
# (CRC32, little-endian length, type: 1 a whole record, 2/3/4 its first/middle/last part) before its bytes.
_BLOCK = 32 * 1024
_HEADER = 7


def _records(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a wandb run file")
    pos, parts = _HEADER, b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if pos + _HEADER + length > len(data):  # still being written
            return
        parts += data[pos + _HEADER:pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):
            yield parts
            parts = b""


def wandb_history(run_dir: str | Path, timeout: float = 60.0) -> list[dict[str, Any]]:
    """The history rows (``run.log`` calls, with ``_step``) of the finished offline run in ``run_dir``, in order.

    wandb's service process writes the file after ``wandb.finish()`` returns: it is read until its exit record is in.
    """
    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in _records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]
