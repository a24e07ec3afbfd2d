"""Corpus cleaning before tokenization, built on datatrove: quality rules (Chinese-aware), exact and
MinHash dedup across shards, PII masking, a report; locally or as Slurm arrays. See tools/clean.py."""
from hpcllm.clean.config import CleanConfig, CleanConfigError, register, validate
from hpcllm.clean.run import run_clean

__all__ = ["CleanConfig", "CleanConfigError", "register", "run_clean", "validate"]
