"""Finding and streaming the input files: jsonl, jsonl.zst and json, or directories of them."""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Iterator, List, Tuple, Union

SUFFIXES = (".jsonl", ".jsonl.zst", ".json")


def find_inputs(spec: str, suffixes=SUFFIXES) -> List[str]:
    """Files named by ``spec`` (comma-separated files or directories), directories walked in sorted order."""
    out = []
    for part in [p for p in spec.split(",") if p]:
        if os.path.isdir(part):
            for root, dirs, files in os.walk(part):
                dirs.sort()
                out += [os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes)]
        elif os.path.isfile(part):
            out.append(part)
        else:
            raise FileNotFoundError(f"input {part!r} does not exist")
    if not out:
        raise FileNotFoundError(f"no {', '.join('*' + s for s in suffixes)} files under {spec!r}")
    return out


def read_lines(path: str) -> Iterator[Tuple[int, Union[str, bytes]]]:
    """(line number, line) with constant memory; a line that is not UTF-8 comes as ``bytes``
    (the parser reports it). A ``.json`` file holding one array is read whole, numbered by element."""
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as raw:
            yield from _numbered(io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)))
        return
    with open(path, "rb") as f:
        if path.endswith(".json") and f.read(1) == b"[":
            f.seek(0)
            for i, obj in enumerate(json.load(f), 1):
                yield i, json.dumps(obj, ensure_ascii=False)
            return
        f.seek(0)
        yield from _numbered(f)


def _numbered(lines) -> Iterator[Tuple[int, Union[str, bytes]]]:
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield i, line.decode("utf-8")
            except UnicodeDecodeError:
                yield i, line


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
