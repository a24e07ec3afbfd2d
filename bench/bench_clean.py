"""Cleaning throughput per core against a plain single-process pass over the same files.

    python bench/bench_clean.py [--mb 16] [--shards 4]

A synthetic corpus (Chinese and English paragraphs recombined from the test fixtures' sentences, with
exact copies, near copies and junk mixed in) is written as jsonl shards. Three passes, one process each:

* plain: read every line, ``json.loads``, count the characters, write it back (the I/O + JSON floor);
* rules: tools/clean.py's zh_web rules without dedup (workers=1);
* full: rules + exact dedup + MinHash dedup (all stages, workers=1).

Prints wall seconds, CPU seconds (this process and its children: on a shared machine the per-core
rates come from CPU time, which other jobs do not inflate), documents/s and MB/s per core for each, and
the ratio to the plain pass.
"""
import argparse
import json
import os
import random
import resource
import shutil
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, os.path.join(ROOT, "tests", "unit", "data", "clean"))

from make_fixtures import EN_KEEP, ZH_KEEP  # noqa: E402


def sentences():
    zh = [s + "。" for p in ZH_KEEP for s in p.split("。") if s]
    en = [s + "." for p in EN_KEEP for s in p.split(". ") if s]
    return zh, en


def make_corpus(folder: str, megabytes: float, shards: int, seed: int = 0) -> int:
    rng = random.Random(seed)
    zh, en = sentences()
    os.makedirs(folder, exist_ok=True)
    files = [open(os.path.join(folder, f"shard_{i}.jsonl"), "w", encoding="utf-8") for i in range(shards)]
    written, docs, recent = 0, 0, []
    while written < megabytes * 1e6:
        roll = rng.random()
        if roll < 0.05 and recent:
            text = rng.choice(recent)  # exact copy
        elif roll < 0.08 and recent:
            text = rng.choice(recent).replace("的", "地", 1) + "对。"  # near copy
        elif roll < 0.12:
            text = " ".join(rng.choice(["首页", "新闻", "体育", "登录", "注册"]) for _ in range(20))  # junk
        else:
            pool = zh if rng.random() < 0.7 else en
            text = "".join(rng.sample(pool, min(len(pool), rng.randint(6, 14))))
            text = text + f" {docs}"  # unique tail so recombinations are not all duplicates
        recent = (recent + [text])[-50:]
        line = json.dumps({"text": text, "id": docs}, ensure_ascii=False) + "\n"
        files[docs % shards].write(line)
        written += len(line.encode())
        docs += 1
    for f in files:
        f.close()
    return docs


def plain_pass(folder: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), encoding="utf-8") as f, open(os.path.join(out, name), "w") as g:
            for line in f:
                record = json.loads(line)
                record["chars"] = len(record["text"])
                g.write(json.dumps(record, ensure_ascii=False) + "\n")


def clean_pass(folder: str, out: str, dedup: bool) -> None:
    import clean as clean_tool
    from hpcllm.clean import run_clean

    overrides = [f"input={folder}", f"output={out}", "workers=1", "language_id.keep=[zh,en]"]
    if not dedup:
        overrides += ["exact_dedup.enabled=false", "minhash.enabled=false"]
    run_clean(clean_tool.compose_config(overrides))


def cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=16)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_clean_")
    try:
        corpus = os.path.join(work, "corpus")
        docs = make_corpus(corpus, args.mb, args.shards)
        size = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus)) / 1e6
        # Warm up: imports (datatrove, matplotlib for the report) would otherwise be charged to one pass.
        make_corpus(os.path.join(work, "tiny"), 0.01, 1)
        clean_pass(os.path.join(work, "tiny"), os.path.join(work, "tiny_out"), dedup=True)
        results = {}
        for name, run in (("plain", lambda o: plain_pass(corpus, o)),
                          ("rules", lambda o: clean_pass(corpus, o, dedup=False)),
                          ("full", lambda o: clean_pass(corpus, o, dedup=True))):
            start, cpu = time.perf_counter(), cpu_seconds()
            run(os.path.join(work, name))
            results[name] = (time.perf_counter() - start, cpu_seconds() - cpu)
        print(f"\ncorpus: {docs:,} documents, {size:.1f} MB in {args.shards} shards; one process each", file=sys.stderr)
        print(f"{'pass':<6} {'wall s':>7} {'cpu s':>7} {'docs/s/core':>12} {'MB/s/core':>10} {'x plain':>8}",
              file=sys.stderr)
        for name, (wall, cpu) in results.items():
            print(f"{name:<6} {wall:7.2f} {cpu:7.2f} {docs / cpu:12,.0f} {size / cpu:10.2f} "
                  f"{cpu / results['plain'][1]:8.1f}", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
