"""Small per-task JSON files that the report merges: counts stay constant-size however big the corpus."""
from __future__ import annotations

import glob
import json
import os


def write_part(parts_folder: str, name: str, payload: dict) -> None:
    """Atomic write, so a task killed mid-write leaves the previous part or none."""
    path = os.path.join(parts_folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(payload, f, ensure_ascii=False)
    os.replace(tmp, path)


def read_parts(parts_folder: str, pattern: str) -> list:
    out = []
    for path in sorted(glob.glob(os.path.join(parts_folder, pattern))):
        with open(path, encoding="utf-8") as f:
            out.append(json.load(f))
    return out
