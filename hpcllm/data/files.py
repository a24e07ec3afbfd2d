"""Finding and streaming the input files: jsonl and json (an array of records), plain or
compressed (.zst, .gz), or directories of them."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import zlib
from typing import BinaryIO, Iterator, List, Tuple, Union

SUFFIXES = (".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz")


class DataError(ValueError):
    """Bad input data; the message names the file (and the line when there is one)."""


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
    (the parser reports it). A ``.json`` file holding one array is read whole, numbered by element.
    A damaged file (corrupt or truncated compression, a broken JSON array) is a ``DataError`` naming it."""
    try:
        with _open(path) as f:
            if _plain_name(path).endswith(".json") and f.peek(1)[:1] == b"[":
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not a valid JSON array ({e.msg} at line {e.lineno} column {e.colno}); "
                                    "fix the file or write one record a line (.jsonl)") from None
                for i, obj in enumerate(records, 1):
                    yield i, json.dumps(obj, ensure_ascii=False)
                return
            yield from _numbered(f)
    except (OSError, EOFError, zlib.error, _zstd_error()) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{path}: the file is damaged ({type(e).__name__}: {e}); nothing of it was used. "
                        "Check it (zstd -t / gzip -t) and download or compress it again") from None


def _plain_name(path: str) -> str:
    for suffix in (".zst", ".gz"):
        if path.endswith(suffix):
            return path[:-len(suffix)]
    return path


def _open(path: str) -> BinaryIO:
    """A buffered binary stream of the decompressed content."""
    if path.endswith(".gz"):
        return io.BufferedReader(gzip.open(path, "rb"))
    if path.endswith(".zst"):
        return io.BufferedReader(_ZstdReader(path))
    return open(path, "rb")


class _ZstdReader(io.RawIOBase):
    """zstd decompression that notices a stream cut short: ``stream_reader`` ends quietly there,
    which would make half a corpus look whole."""

    def __init__(self, path: str):
        import zstandard

        self._raw = open(path, "rb")
        self._new_frame = zstandard.ZstdDecompressor().decompressobj
        self._dobj = self._new_frame()
        self._buf = b""

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not self._buf:
            block = self._raw.read(1 << 20)
            if not block:
                if not self._dobj.eof:
                    raise EOFError("the zstd stream ends before its end marker (a truncated file)")
                return 0
            self._buf = self._decompress(block)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def _decompress(self, block: bytes) -> bytes:
        out = b""
        while block:
            if self._dobj.eof:  # a file of several frames: the next one starts
                self._dobj = self._new_frame()
            out += self._dobj.decompress(block)
            block = self._dobj.unused_data if self._dobj.eof else b""
        return out

    def close(self):
        self._raw.close()
        super().close()


def _zstd_error():
    import zstandard

    return zstandard.ZstdError


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
