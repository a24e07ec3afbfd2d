"""Reading input records into datatrove Documents and writing them back in their own shape.

A Document keeps the original record in ``metadata["record"]``: the cleaned output and the
``excluded/`` files are the user's records (only the text field changed, by PII masking and C4's
line removal), so
memmap_gen reads them and a rule is reverted by moving its excluded files back. Lines that are not
JSON objects or have no text are not skipped silently: they are marked and the first filter moves
them to ``excluded/record/`` with the file and line.
"""
from __future__ import annotations

import io
import os
from typing import Optional

import orjson
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from hpcllm.clean.parts import write_part

INPUT_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
INSTRUCTION_ALIASES = {"instruction": ("instruction", "instruct", "prompt", "question", "query")}
ASK_ROLES = {"ask", "user", "human", "question"}
ANSWER_ROLES = {"ans", "ans-api", "assistant", "gpt", "answer"}


def list_inputs(spec: str) -> list[str]:
    """Input files (a file, or a directory walked in sorted order), as absolute paths."""
    if os.path.isfile(spec):
        return [os.path.abspath(spec)]
    if not os.path.isdir(spec):
        raise FileNotFoundError(f"input={spec!r} does not exist")
    out = []
    for root, dirs, files in os.walk(spec):
        dirs.sort()
        out += [os.path.abspath(os.path.join(root, f)) for f in sorted(files) if f.endswith(INPUT_SUFFIXES)]
    if not out:
        raise FileNotFoundError(f"input={spec!r} holds no {', '.join('*' + s for s in INPUT_SUFFIXES)} files")
    return out


def doc_chars(doc: Document) -> int:
    """A document's length for the report: its text, plus the answer of an SFT record."""
    return len(doc.text) + len(doc.metadata.get("answer", ""))


def input_root(spec: str) -> str:
    """The folder input paths are listed relative to (inputs.txt)."""
    return os.path.abspath(spec if os.path.isdir(spec) else os.path.dirname(spec))


def _string(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("answer"), str):  # ans-api payloads
        return value["answer"]
    return "" if value is None else orjson.dumps(value).decode()


def _turns(record: dict) -> Optional[list]:
    """(role, text) pairs of a conversation record (hpcllm rounds, ShareGPT or OpenAI messages)."""
    if isinstance(record.get("rounds"), list):
        return [(str(r[0]), _string(r[1])) for r in record["rounds"] if isinstance(r, list) and len(r) >= 2]
    for key, role_key, text_key in (("conversations", "from", "value"), ("messages", "role", "content")):
        if isinstance(record.get(key), list):
            return [(str(m.get(role_key)), _string(m.get(text_key))) for m in record[key] if isinstance(m, dict)]
    return None


def sft_fields(record: dict, keys, answer_keys) -> tuple[str, str]:
    """(prompt text made of ``keys``, answer) of an SFT record; conversations give all asks and the last answer."""
    turns = _turns(record)
    if turns is not None:
        asks = [t for role, t in turns if role in ASK_ROLES]
        answers = [t for role, t in turns if role in ANSWER_ROLES]
        return "\n".join(asks), (answers[-1] if answers else "")
    parts = []
    for key in keys:
        for alias in INSTRUCTION_ALIASES.get(key, (key,)):
            if record.get(alias):
                parts.append(_string(record[alias]))
                break
    answer = next((_string(record[k]) for k in answer_keys if record.get(k) is not None), "")
    return "\n".join(parts), answer


class CleanReader(JsonlReader):
    """JsonlReader (jsonl, .gz, .zst) that keeps the record and marks bad lines instead of dropping them."""

    name = "records"

    def __init__(self, data_folder, paths_file, kind: str, text_key: str, sft_keys, answer_keys):
        super().__init__(data_folder, paths_file=paths_file, add_file_path=False)
        self.kind, self.text_key = kind, text_key
        self.sft_keys, self.answer_keys = list(sft_keys), list(answer_keys)

    def _document(self, line: str, source: str) -> Document:
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError as e:
            return _invalid(line, source, "invalid_json", str(e))
        if not isinstance(record, dict):
            return _invalid(line, source, "not_an_object", f"a JSON {type(record).__name__}")
        meta = {"record": record, "source": source, "kind": self.kind}
        if self.kind == "sft":
            text, meta["answer"] = sft_fields(record, self.sft_keys, self.answer_keys)
            missing = "no_prompt"
        else:
            text = record.get(self.text_key)
            missing = "no_text"
        if not isinstance(text, str) or not text.strip():
            meta["invalid"] = missing
            text = text if isinstance(text, str) else ""
        return Document(text=text, id=str(record.get("id", source)), metadata=meta)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        # Bytes, so one line that is not UTF-8 is excluded alone; BufferedReader gives line iteration
        # over the .zst stream too.
        with self.data_folder.open(filepath, "rb", compression=self.compression) as f:
            for number, raw in enumerate(io.BufferedReader(f), 1):
                if not raw.strip():
                    continue
                source = f"{self.data_folder.resolve_paths(filepath)}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _invalid(raw.decode("utf-8", "replace"), source, "invalid_utf8", str(e))
                    continue
                with self.track_time():
                    doc = self._document(line, source)
                yield doc


def _invalid(line: str, source: str, reason: str, detail: str) -> Document:
    return Document(text=line.rstrip("\n"), id=source,
                    metadata={"invalid": reason, "detail": detail, "source": source, "raw": True})


class ShardReader(JsonlReader):
    """Reads exactly this task's intermediate file: dedup signatures number documents per task,
    so task r must read what task r wrote, even when another task wrote nothing."""

    name = "shard"

    def __init__(self, data_folder):
        super().__init__(data_folder, add_file_path=False)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        name = f"{rank:05d}.jsonl.zst"
        if self.data_folder.exists(name):
            yield from self.read_files_shard([name])


def intermediate_writer(folder: str) -> JsonlWriter:
    return JsonlWriter(folder, output_filename="${rank}.jsonl", compression="zstd")


class RecordWriter(JsonlWriter):
    """Writes each document as its original record (text field replaced by the cleaned text)."""

    name = "records"

    def __init__(self, folder: str, text_key: str, compression: str):
        super().__init__(folder, output_filename="${rank}.jsonl",
                         compression=None if compression == "none" else compression)
        self.text_key = text_key

    def _default_adapter(self, document: Document) -> dict:
        meta = document.metadata
        if meta.get("raw"):
            return {"raw": document.text, "clean": {"reason": meta["invalid"], "detail": meta["detail"],
                                                    "source": meta["source"]}}
        record = dict(meta["record"])
        if meta.get("kind") == "text" and not meta.get("invalid"):
            record[self.text_key] = document.text
        if "filter_reason" in meta or meta.get("invalid"):
            record["clean"] = {"reason": meta.get("filter_reason") or meta.get("invalid"), "source": meta["source"]}
        return record


class ExcludedWriter(RecordWriter):
    """excluded/<rule>/: the removed records, plus per-task counts and first examples for the report."""

    def __init__(self, folder: str, text_key: str, compression: str, rule: str, parts_folder: str, examples: int):
        super().__init__(folder, text_key, compression)
        self.rule, self.parts_folder, self.max_examples = rule, parts_folder, examples
        self._rank = None
        self._counts = {}

    def write(self, document: Document, rank: int = 0, **kwargs):
        self._rank = rank
        reason = document.metadata.get("filter_reason") or document.metadata.get("invalid") or self.rule
        document.metadata.setdefault("filter_reason", reason)
        entry = self._counts.setdefault(reason, {"documents": 0, "characters": 0, "examples": []})
        entry["documents"] += 1
        entry["characters"] += doc_chars(document)
        if len(entry["examples"]) < self.max_examples:
            entry["examples"].append({"source": document.metadata.get("source", document.id),
                                      "text": document.text[:300]})
        super().write(document, rank, **kwargs)

    def close(self):
        super().close()
        if self._rank is not None:
            write_part(self.parts_folder, f"excluded/{self.rule}/{self._rank:05d}.json", {"reasons": self._counts})


# Log-spaced length bins (characters): 0, 1, 2, 5, 10, 20, 50, ... 5e7.
LENGTH_EDGES = [0] + [m * 10 ** e for e in range(8) for m in (1, 2, 5)]


class LengthHistogram(PipelineStep):
    """Counts documents and characters passing by, in length bins; one part file per task."""

    type = "📊 - STATS"

    def __init__(self, which: str, parts_folder: str):
        super().__init__()
        self.name, self.which, self.parts_folder = f"lengths_{which}", which, parts_folder

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        import bisect

        bins = [0] * len(LENGTH_EDGES)
        documents = characters = 0
        for doc in data:
            n = doc_chars(doc)
            bins[bisect.bisect_right(LENGTH_EDGES, n) - 1] += 1
            documents += 1
            characters += n
            yield doc
        write_part(self.parts_folder, f"lengths_{self.which}/{rank:05d}.json",
                   {"documents": documents, "characters": characters, "bins": bins})
