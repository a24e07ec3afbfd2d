"""Checks of the eval.* keys that need no data or model: run before anything is loaded, and cheap enough for
composition-time validation to call."""
from __future__ import annotations

from hpcllm.eval.benchmarks import BENCHMARKS
from hpcllm.eval.clue import CLUE_TASKS
from hpcllm.eval.prompts import OVERFLOWS, TEMPLATES
from hpcllm.eval.scoring import LETTER_SCORINGS

GENERATION_TASKS = ("cmrc2018", "generation")
ALL_BENCHMARKS = (*BENCHMARKS, *CLUE_TASKS, *GENERATION_TASKS, "perplexity")


def eval_config_errors(ecfg) -> list:
    """Messages naming each bad eval.* key and its valid values (empty when all are good)."""
    errors = []
    for key, value, valid in (("benchmark", ecfg.benchmark, ALL_BENCHMARKS),
                              ("letter_scoring", ecfg.letter_scoring, LETTER_SCORINGS),
                              ("on_overflow", ecfg.on_overflow, OVERFLOWS), ("template", ecfg.template, TEMPLATES)):
        if value not in valid:
            errors.append(f"eval.{key}={value!r}; valid: {', '.join(valid)}")
    for key, value, least in (("batch_size", ecfg.batch_size, 1), ("shots", ecfg.shots, 0),
                              ("max_new_tokens", ecfg.max_new_tokens, 1)):
        if value < least:
            errors.append(f"eval.{key}={value} must be at least {least}")
    if ecfg.chat_format and ecfg.benchmark in CLUE_TASKS:
        errors.append(f"eval.chat_format=true: {ecfg.benchmark} is scored on the plain prompt (the label word "
                      "follows its cue); set eval.chat_format=false")
    if ecfg.subjects and ecfg.benchmark not in BENCHMARKS:
        errors.append(f"eval.subjects applies to {', '.join(BENCHMARKS)}, not eval.benchmark={ecfg.benchmark}")
    return errors
