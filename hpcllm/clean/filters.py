"""hpcllm's own datatrove steps where datatrove's rules count whitespace words: character lengths,
script-based language id, Chinese punctuation grammar, symbol/digit/URL shares, a blacklist, SFT
answers, and PII masking. Each filter returns (False, reason) so the report counts reasons."""
from __future__ import annotations

import re
from typing import Iterable, Optional

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.filters.gopher_repetition_filter import GopherRepetitionFilter, find_top_duplicate
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.formatters.pii import public_ip_validator

from hpcllm.clean import text as T
from hpcllm.clean.parts import write_part


class RecordFilter(BaseFilter):
    """Drops what the reader marked: lines that are not JSON objects, records without text."""

    name = "record"

    def filter(self, doc: Document):
        problem = doc.metadata.get("invalid")
        return (False, problem) if problem else True


class LanguageFilter(BaseFilter):
    name = "language"

    def __init__(self, keep: Iterable[str], min_ratio: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.keep, self.min_ratio = set(keep), min_ratio

    def filter(self, doc: Document):
        language, share = T.detect_language(doc.text)
        doc.metadata["language"] = language
        if language not in self.keep:
            return False, f"language_{language}"
        return (False, "low_script_ratio") if share < self.min_ratio else True


class LengthFilter(BaseFilter):
    name = "length"

    def __init__(self, min_chars: int, max_chars: Optional[int], min_lines: int, max_line_chars: Optional[int],
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_chars, self.max_chars = min_chars, max_chars
        self.min_lines, self.max_line_chars = min_lines, max_line_chars

    def filter(self, doc: Document):
        n = T.visible_chars(doc.text)
        if n < self.min_chars:
            return False, "too_short"
        if self.max_chars and n > self.max_chars:
            return False, "too_long"
        lines = [line for line in doc.text.splitlines() if line.strip()]
        if len(lines) < self.min_lines:
            return False, "too_few_lines"
        if self.max_line_chars and any(len(line) > self.max_line_chars for line in lines):
            return False, "line_too_long"
        return True


class PunctuationFilter(BaseFilter):
    """Running text ends its lines and sentences with stops (。！？ as well as .!?); menus,
    keyword lists and navigation do not."""

    name = "punctuation"

    def __init__(self, min_terminal_line_ratio: float, min_sentences: int, max_sentence_chars: Optional[int],
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.min_terminal_line_ratio = min_terminal_line_ratio
        self.min_sentences, self.max_sentence_chars = min_sentences, max_sentence_chars

    def filter(self, doc: Document):
        lines = [line.strip() for line in doc.text.splitlines() if line.strip()]
        if not lines:
            return False, "empty"
        if sum(line.endswith(T.TERMINAL) for line in lines) / len(lines) < self.min_terminal_line_ratio:
            return False, "few_terminal_lines"
        sents = [s for s in T.sentences(doc.text) if s.endswith(T.TERMINAL)]
        if len(sents) < self.min_sentences:
            return False, "few_sentences"
        if self.max_sentence_chars and T.visible_chars(doc.text) / len(sents) > self.max_sentence_chars:
            return False, "long_sentences"
        return True


class RatiosFilter(BaseFilter):
    name = "ratios"

    def __init__(self, max_symbol_ratio: float, max_digit_ratio: float, max_url_ratio: float, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.max_symbol_ratio, self.max_digit_ratio = max_symbol_ratio, max_digit_ratio
        self.max_url_ratio = max_url_ratio

    def filter(self, doc: Document):
        n = max(T.visible_chars(doc.text), 1)
        if T.count(T.SYMBOL, doc.text) / n > self.max_symbol_ratio:
            return False, "symbol_ratio"
        if T.count(T.DIGIT, doc.text) / n > self.max_digit_ratio:
            return False, "digit_ratio"
        if sum(len(u) for u in T.URL.findall(doc.text)) / n > self.max_url_ratio:
            return False, "url_ratio"
        return True


def read_blacklist(path: Optional[str], words: Iterable[str] = ()) -> list[str]:
    """Words/phrases, one a line; blank lines and '#' comments skipped; the file named on error."""
    entries = list(words)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                entries += [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"blacklist.path={path!r}: cannot read it ({e})") from None
    return sorted({e for e in entries if e}, key=len, reverse=True)


def blacklist_pattern(entries: list[str]) -> "re.Pattern":
    """One alternation; a Latin word matches as a whole word (ass != class), Chinese anywhere."""
    parts = [rf"(?<![A-Za-z0-9]){re.escape(e)}(?![A-Za-z0-9])" if re.fullmatch(r"[\x00-\x7f]+", e) else re.escape(e)
             for e in entries]
    return re.compile("|".join(parts), re.IGNORECASE)


class BlacklistFilter(BaseFilter):
    name = "blacklist"

    def __init__(self, entries: list[str], max_hits: int, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.entries, self.max_hits = entries, max_hits
        self._pattern = None

    def filter(self, doc: Document):
        if self._pattern is None:
            self._pattern = blacklist_pattern(self.entries)
        hits = self._pattern.findall(doc.text)
        if len(hits) > self.max_hits:
            doc.metadata["blacklist_hits"] = sorted(set(h.lower() for h in hits))[:10]
            return False, "blacklist"
        return True


class SFTAnswerFilter(BaseFilter):
    """Empty and over-long answers or prompts of SFT records (the reader put them in metadata)."""

    name = "sft_answer"

    def __init__(self, drop_empty_answers: bool, max_answer_chars: Optional[int], max_prompt_chars: Optional[int],
                 exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.drop_empty_answers = drop_empty_answers
        self.max_answer_chars, self.max_prompt_chars = max_answer_chars, max_prompt_chars

    def filter(self, doc: Document):
        answer = doc.metadata.get("answer", "")
        if self.drop_empty_answers and not answer.strip():
            return False, "empty_answer"
        if self.max_answer_chars and len(answer) > self.max_answer_chars:
            return False, "answer_too_long"
        if self.max_prompt_chars and len(doc.text) > self.max_prompt_chars:
            return False, "prompt_too_long"
        return True


class CharRepetitionFilter(GopherRepetitionFilter):
    """Gopher repetition for Chinese: datatrove measures the top n-gram with the words joined by
    spaces, which for one-character words doubles its share; here it is measured on the characters."""

    def __init__(self, *args, top_n_grams=(), **kwargs):
        super().__init__(*args, top_n_grams=(), **kwargs)
        self.char_top_n_grams = top_n_grams

    def filter(self, doc: Document):
        verdict = super().filter(doc)
        if verdict is not True:
            return verdict
        words = self.tokenizer.word_tokenize(doc.text)
        for n, max_frac in self.char_top_n_grams:
            grams = ["".join(words[i:i + n]) for i in range(len(words) - n + 1)]
            if grams and find_top_duplicate(grams) / len(doc.text) > max_frac:
                return False, f"top_{n}_gram"
        return True

    @property
    def tokenizer(self):
        return self.language


# Boundaries are ASCII classes, not \b: a Han character counts as a word character for \b.
EMAIL = (r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}"
         r"(?![A-Za-z0-9-])")
# Chinese mobiles (+86 optional, 1[3-9] and 9 digits, spaces/dashes allowed after the 3rd and 7th digit),
# then international / landline numbers written with a leading + or an area code in parentheses/dashes.
PHONE = (r"(?<![\d])(?:(?:\+|00)86[- ]?)?1[3-9]\d[- ]?\d{4}[- ]?\d{4}(?![\d])"
         r"|(?<![\dA-Za-z])(?:\+\d{1,3}[- .]?)?(?:\(\d{2,4}\)|\d{3,4})[- .]\d{3,4}[- .]?\d{3,4}(?![\d])")
CN_ID = r"(?<![\dA-Za-z])[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx](?![\dA-Za-z])"
IPV4 = r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|[01]?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|[01]?\d?\d)(?![\d.])"
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def valid_cn_id(number: str) -> bool:
    """GB 11643-1999 check digit of an 18-character resident ID number."""
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS))
    return "10X98765432"[total % 11] == number[17].upper()


class PIIMasker(BaseFormatter):
    """Replaces PII in the text (and, for SFT records, in every string of the record);
    counts per kind go to the report."""

    name = "pii"

    def __init__(self, parts_folder: str, kinds: dict):
        super().__init__()
        self.parts_folder = parts_folder
        self.kinds = kinds  # kind -> replacement, in matching order (IDs before phones: an ID holds digits)
        self.counts = {kind: 0 for kind in kinds}
        self._patterns = None

    def _compiled(self):
        if self._patterns is None:
            regexes = {"id_number": CN_ID, "email": EMAIL, "phone": PHONE, "ip": IPV4}
            self._patterns = [(kind, re.compile(regexes[kind]), repl) for kind, repl in self.kinds.items()]
        return self._patterns

    def _mask_one(self, kind, match, repl):
        value = match.group(0)
        if (kind == "id_number" and not valid_cn_id(value)) or (kind == "ip" and not public_ip_validator(value)):
            return value
        self.counts[kind] += 1
        return repl

    def format(self, text: str) -> str:
        for kind, pattern, repl in self._compiled():
            text = pattern.sub(lambda m, k=kind, r=repl: self._mask_one(k, m, r), text)
        return text

    def _mask_record(self, value):
        if isinstance(value, str):
            return self.format(value)
        if isinstance(value, list):
            return [self._mask_record(v) for v in value]
        if isinstance(value, dict):
            return {k: self._mask_record(v) for k, v in value.items()}
        return value

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.counts = {kind: 0 for kind in self.kinds}
        for doc in data:
            with self.track_time():
                if doc.metadata.get("kind") == "sft":  # the record is what is written; its text only dedups
                    doc.metadata["record"] = self._mask_record(doc.metadata["record"])
                else:
                    doc.text = self.format(doc.text)
            yield doc
        write_part(self.parts_folder, f"pii/{rank:05d}.json", {"masked": self.counts})
