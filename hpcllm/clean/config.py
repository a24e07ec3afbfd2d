"""Typed configuration of a cleaning run: one small dataclass per step, composed by ``CleanConfig``.

Presets in ``conf/clean/`` (zh_web, en_web, sft) extend ``base_clean`` (``defaults: [base_clean, _self_]``),
so a misspelt key fails at composition naming it. Every step has ``enabled``; a disabled step is not
built. Lengths are in characters (not whitespace words), which is what Chinese text needs.
"""
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class LanguageConfig:
    """Language id by script: the share of Han vs Latin letters decides zh / en (no model download)."""

    enabled: bool = True
    keep: List[str] = field(default_factory=lambda: ["zh"])  # zh | en | other
    min_ratio: float = 0.5  # the kept language's share of all letters


@dataclass
class LengthConfig:
    """Document length in non-whitespace characters and lines."""

    enabled: bool = True
    min_chars: int = 50
    max_chars: Optional[int] = 200_000
    min_lines: int = 1
    max_line_chars: Optional[int] = None  # a single line longer than this drops the document


@dataclass
class PunctuationConfig:
    """Chinese/English punctuation grammar: lines end in sentence punctuation, text has sentences."""

    enabled: bool = True
    min_terminal_line_ratio: float = 0.3  # share of lines ending in 。！？.!?…」” etc.
    min_sentences: int = 2
    max_sentence_chars: Optional[int] = 400  # average characters per sentence (keyword lists have no stops)


@dataclass
class RatiosConfig:
    """Symbol, digit and URL shares of the non-whitespace characters."""

    enabled: bool = True
    max_symbol_ratio: float = 0.2
    max_digit_ratio: float = 0.3
    max_url_ratio: float = 0.3


@dataclass
class GopherQualityConfig:
    """datatrove's GopherQualityFilter (Rae et al. 2021) with hpcllm's script-aware word splitter
    (a Han character is one word). Chinese presets disable the word-length rules."""

    enabled: bool = True
    min_doc_words: Optional[int] = 50
    max_doc_words: Optional[int] = 100_000
    min_avg_word_length: Optional[int] = 3
    max_avg_word_length: Optional[int] = 10
    max_symbol_word_ratio: Optional[float] = 0.1
    max_bullet_lines_ratio: Optional[float] = 0.9
    max_ellipsis_lines_ratio: Optional[float] = 0.3
    max_non_alpha_words_ratio: Optional[float] = 0.8
    min_stop_words: Optional[int] = 2
    stop_words: Optional[List[str]] = None  # None = datatrove's English list


@dataclass
class GopherRepetitionConfig:
    """datatrove's GopherRepetitionFilter: duplicate lines/paragraphs and n-gram repetition
    (n-grams of words, of characters for Chinese). Pairs are [n, max fraction]."""

    enabled: bool = True
    dup_line_frac: Optional[float] = 0.3
    dup_para_frac: Optional[float] = 0.3
    dup_line_char_frac: Optional[float] = 0.2
    dup_para_char_frac: Optional[float] = 0.2
    top_n_grams: List[Any] = field(default_factory=lambda: [[2, 0.2], [3, 0.18], [4, 0.16]])
    dup_n_grams: List[Any] = field(
        default_factory=lambda: [[5, 0.15], [6, 0.14], [7, 0.13], [8, 0.12], [9, 0.11], [10, 0.10]])


@dataclass
class C4Config:
    """datatrove's C4QualityFilter (drops lines: javascript, policy; documents: lorem ipsum, '{')."""

    enabled: bool = False
    filter_no_terminal_punct: bool = False  # FineWeb's choice: C4's line rule drops too much
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    filter_curly_bracket: bool = True


@dataclass
class FineWebConfig:
    """datatrove's FineWebQualityFilter: line punctuation, short lines, duplicated line characters."""

    enabled: bool = False
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


@dataclass
class BlacklistConfig:
    """Words/phrases from a file (one a line, '#' comments): a document with more than ``max_hits``
    occurrences is dropped. Latin words match whole words, case-insensitively."""

    enabled: bool = False
    path: Optional[str] = None
    words: List[str] = field(default_factory=list)  # added to the file's
    max_hits: int = 0


@dataclass
class PIIConfig:
    """Mask e-mail addresses, phone numbers (incl. Chinese mobiles) and Chinese ID numbers (checksum-valid)."""

    enabled: bool = False
    emails: bool = True
    phones: bool = True
    id_numbers: bool = True
    ips: bool = False
    email_replacement: str = "<EMAIL>"
    phone_replacement: str = "<PHONE>"
    id_replacement: str = "<ID_NUMBER>"
    ip_replacement: str = "<IP>"


@dataclass
class SFTRecordConfig:
    """SFT records: which fields make the deduplicated text and which is the answer."""

    prompt_keys: List[str] = field(default_factory=lambda: ["instruction", "input"])
    answer_keys: List[str] = field(default_factory=lambda: ["output", "answer", "response"])
    drop_empty_answers: bool = True
    max_answer_chars: Optional[int] = 8192
    max_prompt_chars: Optional[int] = None


@dataclass
class ExactDedupConfig:
    """Exact duplicates of the (normalized) text across all shards; the first copy is kept."""

    enabled: bool = True
    normalize: bool = True  # lowercase, collapse whitespace, drop punctuation before hashing
    finder_workers: int = 1


@dataclass
class MinHashConfig:
    """MinHash LSH near-duplicates (datatrove): n-gram shingles of words (characters for Chinese);
    pairs with Jaccard above about (1/num_buckets)^(1/hashes_per_bucket) are clustered, one kept."""

    enabled: bool = True
    n_grams: int = 5
    num_buckets: int = 14
    hashes_per_bucket: int = 8
    seed: int = 1


@dataclass
class SemanticDedupConfig:
    """Embedding-based dedup (SFT): cosine similarity above ``threshold`` between mean-pooled
    embeddings of a local encoder model (``model_path``: a Hugging Face directory)."""

    enabled: bool = False
    model_path: Optional[str] = None
    threshold: float = 0.95
    batch_size: int = 64
    max_length: int = 256


@dataclass
class SlurmCleanConfig:
    """Slurm array jobs (datatrove's SlurmPipelineExecutor), one array per stage, chained by afterok."""

    partition: Optional[str] = None  # None = the cluster's default partition
    time: str = "04:00:00"
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    qos: Optional[str] = None
    account: Optional[str] = None
    array_parallelism: int = -1  # -1 = no limit
    job_name: str = "hpcllm-clean"
    sbatch_args: Dict[str, str] = field(default_factory=dict)


@dataclass
class CleanConfig:
    """A cleaning run: input shards -> quality rules -> exact dedup -> MinHash dedup -> OUTPUT/data."""

    input: str = MISSING  # a .jsonl/.jsonl.gz/.jsonl.zst file or a directory of them
    output: str = MISSING  # OUTPUT/data (cleaned), OUTPUT/excluded/<rule>, OUTPUT/clean_report.*
    name: str = "custom"
    kind: str = "text"  # text (a text field) | sft (instruction records)
    text_key: str = "text"
    language: str = "zh"  # zh | en: word splitting for the Gopher rules and MinHash shingles
    tasks: Optional[int] = None  # None = one task per input file
    workers: Optional[int] = None  # local processes at once; None = all cores
    cluster: str = "local"  # local | slurm
    wait: bool = False  # slurm: block until the report is written
    overwrite: bool = False
    compression: str = "zstd"  # zstd | gzip | none, for OUTPUT/data and OUTPUT/excluded
    examples_per_rule: int = 5
    language_id: LanguageConfig = field(default_factory=LanguageConfig)
    length: LengthConfig = field(default_factory=LengthConfig)
    punctuation: PunctuationConfig = field(default_factory=PunctuationConfig)
    ratios: RatiosConfig = field(default_factory=RatiosConfig)
    gopher_quality: GopherQualityConfig = field(default_factory=GopherQualityConfig)
    gopher_repetition: GopherRepetitionConfig = field(default_factory=GopherRepetitionConfig)
    c4: C4Config = field(default_factory=C4Config)
    fineweb: FineWebConfig = field(default_factory=FineWebConfig)
    blacklist: BlacklistConfig = field(default_factory=BlacklistConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    sft: SFTRecordConfig = field(default_factory=SFTRecordConfig)
    exact_dedup: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    semantic_dedup: SemanticDedupConfig = field(default_factory=SemanticDedupConfig)
    slurm: SlurmCleanConfig = field(default_factory=SlurmCleanConfig)


class CleanConfigError(ValueError):
    """A cleaning config that cannot run; the message names the key to change."""


def validate(cfg) -> None:
    """Checks that need no data; each message names the override to change."""
    choices = {"kind": ("text", "sft"), "language": ("zh", "en"), "cluster": ("local", "slurm"),
               "compression": ("zstd", "gzip", "none")}
    for key, valid in choices.items():
        if cfg[key] not in valid:
            raise CleanConfigError(f"{key}={cfg[key]!r} is not one of {', '.join(valid)}")
    bad_lang = set(cfg.language_id.keep) - {"zh", "en", "other"}
    if cfg.language_id.enabled and bad_lang:
        raise CleanConfigError(f"language_id.keep has {sorted(bad_lang)}: use zh, en or other")
    if cfg.blacklist.enabled and not cfg.blacklist.path and not cfg.blacklist.words:
        raise CleanConfigError("blacklist.enabled=true needs blacklist.path=FILE (one word or phrase a line) "
                               "or blacklist.words=[...]")
    if cfg.semantic_dedup.enabled:
        if cfg.kind != "sft":
            raise CleanConfigError("semantic_dedup is for SFT sets: set kind=sft (or semantic_dedup.enabled=false)")
        if not cfg.semantic_dedup.model_path:
            raise CleanConfigError("semantic_dedup.enabled=true needs semantic_dedup.model_path=DIR, a local "
                                   "Hugging Face encoder (e.g. bge-small-zh); nothing is downloaded")
    if cfg.minhash.enabled and cfg.minhash.n_grams < 1:
        raise CleanConfigError("minhash.n_grams must be >= 1")
    if cfg.cluster == "slurm" and not re.fullmatch(r"[\w./+-]+", os.path.abspath(cfg.output)):
        # datatrove writes the log and pickle paths into its sbatch script unquoted.
        raise CleanConfigError(f"output={cfg.output!r}: with cluster=slurm the path may hold only letters, digits "
                               "and . _ - + / (datatrove's Slurm script does not quote it)")
    if cfg.tasks is not None and cfg.tasks < 1:
        raise CleanConfigError(f"tasks={cfg.tasks}: must be >= 1 (or null for one task per input file)")


def register() -> None:
    ConfigStore.instance().store(name="base_clean", node=CleanConfig)
