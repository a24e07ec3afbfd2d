"""The cleaning run as datatrove stages, each one executor (local processes or a Slurm array):

1. ``filter`` (one task per shard): read -> record check -> language -> length -> punctuation -> ratios
   -> Gopher quality/repetition -> C4 -> FineWeb -> blacklist -> SFT answers -> PII masking -> write,
   plus the exact-dedup signatures of what was kept;
2. ``exact_find`` (finder tasks) and ``exact_filter`` (per shard) remove exact copies across shards,
   writing the MinHash signatures of what is left;
3. ``minhash_buckets`` (one task per bucket), ``minhash_cluster`` (one task), ``minhash_filter`` (per
   shard) remove near-duplicates and write OUTPUT/data;
4. ``semantic_dedup`` (one task, SFT, optional): embedding similarity of the prompts;
5. ``report`` (one task) merges the per-task counts into clean_report.json/.md and the histogram PNG.

Dedup runs after the rules so signatures only cover kept documents. Each stage's completion markers
(OUTPUT/logs/<stage>/completions) make a rerun skip finished tasks; a task that was killed is
redone whole (its files are rewritten, not appended to).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, List, Optional

from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (ExactDedupConfig, ExactDedupFilter, ExactDedupSignature,
                                                  ExactFindDedups)
from datatrove.pipeline.dedup.minhash import (MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster,
                                              MinhashDedupFilter, MinhashDedupSignature)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                        GopherRepetitionFilter)
from datatrove.utils.hashing import HashConfig
from datatrove.utils.text import TextNormConfig, simplify_text

from hpcllm.clean import filters as F
from hpcllm.clean.records import (CleanReader, ExcludedWriter, LengthHistogram, RecordWriter, ShardReader,
                                  input_root, intermediate_writer)
from hpcllm.clean.semantic import SemanticDedup
from hpcllm.clean.text import ScriptWordTokenizer

# The order rules run in (Gopher repetition before quality, as FineWeb does) and the report's row order.
RULES = ("record", "language", "length", "punctuation", "ratios", "gopher_repetition", "gopher_quality", "c4",
         "fineweb", "blacklist", "sft_answer", "exact_dedup", "minhash_dedup", "semantic_dedup")


@dataclass
class Stage:
    name: str
    steps: List[PipelineStep]
    tasks: int


class Layout:
    """Where everything lives under OUTPUT."""

    def __init__(self, output: str):
        self.root = os.path.abspath(output)
        self.data = os.path.join(self.root, "data")
        self.excluded = os.path.join(self.root, "excluded")
        self.work = os.path.join(self.root, "work")
        self.parts = os.path.join(self.work, "parts")
        self.logs = os.path.join(self.root, "logs")
        self.inputs = os.path.join(self.work, "inputs.txt")

    def w(self, name: str) -> str:
        return os.path.join(self.work, name)


def exact_content(doc) -> str:
    """What exact dedup compares: the text, lowercased, whitespace collapsed, punctuation dropped."""
    return simplify_text(doc.text, TextNormConfig(norm_numbers=False, norm_unicode_diacritics=False))


def raw_content(doc) -> str:
    return doc.text


def _excluded(cfg, layout: Layout, rule: str) -> ExcludedWriter:
    return ExcludedWriter(os.path.join(layout.excluded, rule), cfg.text_key, cfg.compression, rule, layout.parts,
                          cfg.examples_per_rule)


def rule_steps(cfg, layout: Layout) -> List[PipelineStep]:
    """The quality rules enabled in ``cfg``, in RULES order, each with its excluded/<rule>/ writer."""
    tok = ScriptWordTokenizer(cfg.language)
    repetition = F.CharRepetitionFilter if cfg.language == "zh" else GopherRepetitionFilter
    ex = lambda rule: _excluded(cfg, layout, rule)  # noqa: E731
    steps: List[PipelineStep] = [F.RecordFilter(exclusion_writer=ex("record"))]
    builders: List[tuple[str, object, Callable]] = [
        ("language", cfg.language_id, lambda c: F.LanguageFilter(c.keep, c.min_ratio, ex("language"))),
        ("length", cfg.length, lambda c: F.LengthFilter(c.min_chars, c.max_chars, c.min_lines, c.max_line_chars,
                                                         ex("length"))),
        ("punctuation", cfg.punctuation, lambda c: F.PunctuationFilter(
            c.min_terminal_line_ratio, c.min_sentences, c.max_sentence_chars, ex("punctuation"))),
        ("ratios", cfg.ratios, lambda c: F.RatiosFilter(c.max_symbol_ratio, c.max_digit_ratio, c.max_url_ratio,
                                                         ex("ratios"))),
        ("gopher_repetition", cfg.gopher_repetition, lambda c: repetition(
            dup_line_frac=c.dup_line_frac, dup_para_frac=c.dup_para_frac, dup_line_char_frac=c.dup_line_char_frac,
            dup_para_char_frac=c.dup_para_char_frac, top_n_grams=tuple((int(n), float(f)) for n, f in c.top_n_grams),
            dup_n_grams=tuple((int(n), float(f)) for n, f in c.dup_n_grams), exclusion_writer=ex("gopher_repetition"),
            language=tok)),
        ("gopher_quality", cfg.gopher_quality, lambda c: GopherQualityFilter(
            c.min_doc_words, c.max_doc_words, c.min_avg_word_length, c.max_avg_word_length, c.max_symbol_word_ratio,
            c.max_bullet_lines_ratio, c.max_ellipsis_lines_ratio, c.max_non_alpha_words_ratio, c.min_stop_words,
            list(c.stop_words) if c.stop_words is not None else None, ex("gopher_quality"), language=tok)),
        ("c4", cfg.c4, lambda c: C4QualityFilter(
            ex("c4"), filter_no_terminal_punct=c.filter_no_terminal_punct, min_num_sentences=c.min_num_sentences,
            min_words_per_line=c.min_words_per_line, filter_curly_bracket=c.filter_curly_bracket, language=tok)),
        ("fineweb", cfg.fineweb, lambda c: FineWebQualityFilter(
            ex("fineweb"), line_punct_thr=c.line_punct_thr, short_line_thr=c.short_line_thr,
            short_line_length=c.short_line_length, char_duplicates_ratio=c.char_duplicates_ratio,
            new_line_ratio=c.new_line_ratio, language=tok)),
        ("blacklist", cfg.blacklist, lambda c: F.BlacklistFilter(F.read_blacklist(c.path, c.words), c.max_hits,
                                                                  ex("blacklist"))),
    ]
    steps += [build(section) for _, section, build in builders if section.enabled]
    if cfg.kind == "sft":
        s = cfg.sft
        steps.append(F.SFTAnswerFilter(s.drop_empty_answers, s.max_answer_chars, s.max_prompt_chars, ex("sft_answer")))
    if cfg.pii.enabled:
        p = cfg.pii
        kinds = {"id_number": p.id_replacement, "email": p.email_replacement, "phone": p.phone_replacement,
                 "ip": p.ip_replacement}
        wanted = {"id_number": p.id_numbers, "email": p.emails, "phone": p.phones, "ip": p.ips}
        steps.append(F.PIIMasker(layout.parts, {k: v for k, v in kinds.items() if wanted[k]}))
    return steps


def _minhash_config(cfg) -> MinhashConfig:
    m = cfg.minhash
    return MinhashConfig(n_grams=m.n_grams, num_buckets=m.num_buckets, hashes_per_bucket=m.hashes_per_bucket,
                         seed=m.seed, hash_config=HashConfig(precision=64))


def build_stages(cfg, num_files: int) -> List[Stage]:
    """The stages of a run, each a list of datatrove steps and its number of tasks."""
    layout = Layout(cfg.output)
    tasks = cfg.tasks or num_files
    exact, minhash = cfg.exact_dedup, cfg.minhash
    exact_cfg = ExactDedupConfig(content_getter=exact_content if exact.normalize else raw_content,
                                 hash_config=HashConfig(precision=64))
    mh_cfg = _minhash_config(cfg)
    tok = ScriptWordTokenizer(cfg.language)
    semantic = cfg.semantic_dedup

    def final_writer() -> List[PipelineStep]:
        """The end of the last stage: OUTPUT/data, or the input of the semantic stage."""
        if semantic.enabled:
            return [intermediate_writer(layout.w("near_deduped"))]
        return [LengthHistogram("after", layout.parts), RecordWriter(layout.data, cfg.text_key, cfg.compression)]

    def semantic_stage() -> List[Stage]:
        if not semantic.enabled:
            return []
        step = SemanticDedup(semantic.model_path, semantic.threshold, semantic.batch_size, semantic.max_length,
                             _excluded(cfg, layout, "semantic_dedup"))
        reader = JsonlReader(layout.w("near_deduped"), add_file_path=False)
        return [Stage("semantic_dedup", [reader, step, LengthHistogram("after", layout.parts),
                                         RecordWriter(layout.data, cfg.text_key, cfg.compression)], 1)]

    def dedup_head(folder: str) -> List[PipelineStep]:
        """After writing ``folder``: the signatures of the next dedup that will read it."""
        if exact.enabled and folder == layout.w("filtered"):
            return [intermediate_writer(folder), ExactDedupSignature(layout.w("exact_sigs"), exact_cfg,
                                                                     finder_workers=exact.finder_workers)]
        return [intermediate_writer(folder), MinhashDedupSignature(layout.w("minhash_sigs"), mh_cfg, language=tok)]

    reader = CleanReader(input_root(cfg.input), layout.inputs, cfg.kind, cfg.text_key, cfg.sft.prompt_keys,
                         cfg.sft.answer_keys)
    head = [reader, LengthHistogram("before", layout.parts)] + rule_steps(cfg, layout)
    stages: List[Stage] = []
    if not exact.enabled and not minhash.enabled:
        return [Stage("filter", head + final_writer(), tasks)] + semantic_stage()
    stages.append(Stage("filter", head + dedup_head(layout.w("filtered")), tasks))
    source = layout.w("filtered")
    if exact.enabled:
        stages.append(Stage("exact_find", [ExactFindDedups(layout.w("exact_sigs"), layout.w("exact_dups"), exact_cfg)],
                            exact.finder_workers))
        drop = [ShardReader(source), ExactDedupFilter(layout.w("exact_dups"), exact_cfg,
                                                      exclusion_writer=_excluded(cfg, layout, "exact_dedup"))]
        if not minhash.enabled:
            return stages + [Stage("exact_filter", drop + final_writer(), tasks)] + semantic_stage()
        stages.append(Stage("exact_filter", drop + dedup_head(layout.w("deduped")), tasks))
        source = layout.w("deduped")
    buckets, remove = layout.w("minhash_buckets"), layout.w("minhash_remove")
    near = MinhashDedupFilter(remove, exclusion_writer=_excluded(cfg, layout, "minhash_dedup"))
    stages += [
        Stage("minhash_buckets", [MinhashDedupBuckets(layout.w("minhash_sigs"), buckets, config=mh_cfg)],
              minhash.num_buckets),
        Stage("minhash_cluster", [MinhashDedupCluster(buckets, remove, config=mh_cfg)], 1),
        Stage("minhash_filter", [ShardReader(source), near] + final_writer(), tasks),
    ]
    return stages + semantic_stage()
