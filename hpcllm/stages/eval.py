"""method=eval: multiple-choice benchmarks (C-Eval, MMLU) and perplexity, data-parallel over the job's ranks.

Questions are put into batches the same way whatever the world size (by prompt length, then cut
into ``eval.batch_size`` groups) and rank r scores batches r, r+W, ...; so every batch holds the
same prompts with the same padding in a 1- and an N-process run, and the predictions agree exactly.
Rank 0 gathers the rows and writes the reports.

Under zero=stage3 the model is partitioned over the ranks (an optimizer-less DeepSpeed engine,
``ds_config_eval.json``; parameters offloaded with stage3_offload), so a model larger than one
GPU can be evaluated. Its forwards gather parameters collectively, so every rank then runs the same
number of batches: ranks with one batch fewer score a filler batch and discard it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from hpcllm.config import ConfigError
from hpcllm.distributed import DistEnv, all_reduce, barrier
from hpcllm.eval.benchmarks import LETTERS, SAMPLE_DIR, default_data_dir, get_benchmark, load_benchmark
from hpcllm.eval.config import GENERATION_TASKS, eval_config_errors
from hpcllm.eval.clue import CLUE_TASKS, choose_by_perplexity, clue_prompt, cue_of, load_clue
from hpcllm.eval.prompts import ChatEncoder, PromptOverflow, Prompter, encode_plain, fit_prompt, user_turn
from hpcllm.eval.report import summarize, write_reports, write_task_reports
from hpcllm.eval.scoring import choose, continuation_ids, continuation_logprobs, resolve_letter_scoring

from hpcllm.stages.base import StageContext


def run_eval(ctx: StageContext) -> str:
    errors = eval_config_errors(ctx.cfg.eval)
    if errors:
        raise ConfigError("; ".join(errors))
    benchmark = ctx.cfg.eval.benchmark
    if benchmark == "perplexity":
        evaluate_perplexity(ctx)
    elif benchmark in CLUE_TASKS:
        evaluate_clue(ctx)
    elif benchmark in GENERATION_TASKS:
        evaluate_generation(ctx)
    else:
        evaluate_choices(ctx)
    barrier()
    return "completed"


def load_eval_model(ctx: StageContext) -> torch.nn.Module:
    """model.path as a Hugging Face directory, or a peft adapter (adapter_config.json) over its base:
    the base named in the adapter, or the preset's seeded random weights when it names none."""
    from hpcllm.models.build import build_model

    cfg = ctx.cfg
    path = cfg.model.path
    adapter = Path(path) / "adapter_config.json" if path else None
    model_cfg = cfg.model
    if adapter is not None and adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") or None
        model_cfg = OmegaConf.merge(cfg.model, {"path": base})
    model = build_model(model_cfg, precision=ctx.derived.precision, attention=cfg.train.attention, seed=cfg.seed,
                        tokenizer=ctx.tokenizer)
    if ctx.tokenizer is not None and len(ctx.tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(ctx.tokenizer))
    if adapter is not None and adapter.is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, path)
    partitioned = ctx.run_dir / "ds_config_eval.json"
    if partitioned.is_file():
        from hpcllm.train.engines import frozen_engine

        return frozen_engine(model, json.loads(partitioned.read_text()), name="evaluated model")
    return model.to(device_of(ctx)).eval()


def rank_share(items: Sequence, ctx: StageContext) -> List[tuple]:
    """(item, is_filler) for this rank's items r, r+W, ...; under ZeRO-3 padded with fillers (repeats of
    the first item) to as many as the busiest rank has, as partitioned forwards are collective."""
    world, rank = ctx.dist.world_size, ctx.dist.rank
    mine = [(item, False) for item in items[rank::world]]
    if (ctx.run_dir / "ds_config_eval.json").is_file() and items:
        mine += [(items[0], True)] * (-(-len(items) // world) - len(mine))
    return mine


def device_of(ctx: StageContext) -> torch.device:
    if ctx.cfg.hw.accelerator == "cuda" and torch.cuda.is_available():
        return torch.device("cuda", ctx.dist.local_rank)
    return torch.device("cpu")


def plan_batches(lengths: Sequence[int], batch_size: int) -> List[List[int]]:
    """Question indices, longest prompts first (less padding), cut into batches; independent of the world size."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def gather_to_main(obj, dist: DistEnv) -> list:
    """Every rank's ``obj`` on rank 0 (a list in rank order); other ranks get []."""
    import torch.distributed as tdist

    if dist.world_size == 1 or not (tdist.is_available() and tdist.is_initialized()):
        return [obj]
    out = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(obj, out, dst=0)
    return out or []


def _progress(items, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="batch", disable=not enabled)


def run_batches(ctx: StageContext, lengths: Sequence[int], score: Callable[[List[int]], List[dict]],
                desc: str) -> Optional[List[dict]]:
    """Score this rank's batches of items (``score`` gets item indices, returns one row each with its
    "index"); rank 0 gets every rank's rows in item order, the others None."""
    dist = ctx.dist
    desc += f" (rank 0 of {dist.world_size})" if dist.world_size > 1 else ""
    rows = []
    for batch, filler in _progress(rank_share(plan_batches(lengths, ctx.cfg.eval.batch_size), ctx), dist.is_main, desc):
        scored = score(batch)
        if not filler:
            rows += scored
    gathered = gather_to_main(rows, dist)
    if not dist.is_main:
        return None
    return sorted((r for part in gathered for r in part), key=lambda r: r["index"])


def check_fits(prompter: Prompter, items, shots: int, max_len: int) -> None:
    """eval.on_overflow=fail: refuse before any forward (every rank finds the same prompt, none is left
    waiting in a collective)."""
    for sd, q in items:
        try:
            prompter.fit(sd.subject, sd.dev, q, shots, max_len, "fail")
        except PromptOverflow as err:
            raise ConfigError(f"eval.on_overflow=fail: {sd.subject} question {q.id}: {err}. Lower eval.shots, or set "
                              "eval.on_overflow=truncate_left (as lm-eval) or drop_shots") from err


def evaluate_choices(ctx: StageContext) -> None:
    cfg, ecfg, dist, tok = ctx.cfg, ctx.cfg.eval, ctx.dist, ctx.tokenizer
    bench = get_benchmark(ecfg.benchmark)
    split = ecfg.split or bench.default_split
    data_dir = ecfg.data_dir or str(default_data_dir(bench.name))
    try:
        subjects = load_benchmark(bench, data_dir, split, list(ecfg.subjects) if ecfg.subjects else None)
        prompter = Prompter(bench, tok, cfg.model.prompt_format if ecfg.chat_format else None,
                            OmegaConf.to_container(cfg.model.special_tokens), ecfg.template)
        scoring = resolve_letter_scoring(tok, *prompter.answer_context(), ecfg.letter_scoring)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    if scoring.fallback and dist.is_main:
        print(f"[eval] warning: {scoring.fallback}", file=sys.stderr, flush=True)
    items = [(sd, q) for sd in subjects for q in sd.questions]
    # the model reads the prompt and every token of the longest answer but its last
    max_len = cfg.model.max_positions - (scoring.longest - 1)
    if ecfg.on_overflow == "fail":
        check_fits(prompter, items, ecfg.shots, max_len)
    full_prompts = [prompter.build(sd.subject, sd.dev, q, ecfg.shots) for sd, q in items]
    model, device = load_eval_model(ctx), device_of(ctx)

    def score(batch):
        fitted = [prompter.fit(items[i][0].subject, items[i][0].dev, items[i][1], ecfg.shots, max_len, ecfg.on_overflow)
                  for i in batch]
        logprobs = continuation_logprobs(model, [f.ids for f in fitted], scoring.continuations, tok.pad_token_id, device)
        rows = []
        for i, f, pred, p in zip(batch, fitted, choose(logprobs), logprobs.softmax(-1).tolist()):
            sd, q = items[i]
            rows.append({"index": i, "subject": sd.subject, "category": bench.category(sd.subject), "id": q.id,
                         "answer": q.answer, "prediction": LETTERS[pred], "shots": f.shots,
                         "shots_requested": min(ecfg.shots, len(sd.dev)), "truncated": f.truncated,
                         "prompt_tokens": len(f.ids), "probs": p, "question": q.question})
        return rows

    start = time.time()
    rows = run_batches(ctx, [len(p) for p in full_prompts], score, f"{bench.title} {split} {ecfg.shots}-shot")
    if rows is None:
        return
    meta = {"title": bench.title, "model": cfg.model.name, "model_path": cfg.model.path, "split": split,
            "shots": ecfg.shots, "data_dir": str(data_dir), "chat_format": cfg.model.prompt_format if ecfg.chat_format else None,
            "template": ecfg.template, "max_length": cfg.model.max_positions, "on_overflow": ecfg.on_overflow,
            "letter_scoring": scoring.mode, "letter_scoring_requested": scoring.requested,
            "letter_fallback": scoring.fallback, "letter_text": scoring.text,
            "letter_tokens": {l: tok.convert_ids_to_tokens(list(c)) for l, c in zip(LETTERS, scoring.continuations)},
            "world_size": dist.world_size, "batch_size": ecfg.batch_size, "seconds": round(time.time() - start, 2)}
    summary = summarize(bench, rows)
    write_reports(ctx.run_dir, summary, rows, meta)
    overall = summary["overall"]["accuracy_over_questions"]
    print(f"[eval] {bench.title} {split} {ecfg.shots}-shot: {len(rows)} questions, accuracy "
          f"{'-' if overall is None else f'{100 * overall:.1f}%'} -> {ctx.run_dir / 'results.md'}", flush=True)


def task_meta(ctx: StageContext, title: str, split: Optional[str], data: str, **extra) -> dict:
    cfg = ctx.cfg
    return {"benchmark": cfg.eval.benchmark, "title": title, "model": cfg.model.name, "model_path": cfg.model.path,
            "split": split, "shots": cfg.eval.shots, "data_dir": data, "max_length": cfg.model.max_positions,
            "world_size": ctx.dist.world_size, "batch_size": cfg.eval.batch_size, **extra}


def evaluate_clue(ctx: StageContext) -> None:
    """A CLUE classification task: the label whose word has the lowest perplexity after the prompt."""
    cfg, ecfg, tok = ctx.cfg, ctx.cfg.eval, ctx.tokenizer
    split = ecfg.split or "dev"
    data_dir = ecfg.data_dir or str(SAMPLE_DIR / "clue" / ecfg.benchmark)
    try:
        data = load_clue(ecfg.benchmark, data_dir, split, ecfg.shots)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    labels = list(data.words)
    continuations = [continuation_ids(tok, cue_of(data.task), data.words[l]) for l in labels]
    lengths = [len(c) for c in continuations]
    max_len = cfg.model.max_positions - (max(lengths) - 1)
    model, device = load_eval_model(ctx), device_of(ctx)

    def score(batch):
        fitted = [fit_prompt(lambda t: encode_plain(tok, t), lambda k: clue_prompt(data, data.examples[i], k),
                             ecfg.shots, max_len, 0, ecfg.on_overflow) for i in batch]
        summed = continuation_logprobs(model, [f.ids for f in fitted], continuations, tok.pad_token_id, device)
        rows = []
        for i, f, sums in zip(batch, fitted, summed.tolist()):
            best, nll = choose_by_perplexity(sums, lengths)
            ex = data.examples[i]
            rows.append({"index": i, "line": ex.line, "label": ex.label, "prediction": labels[best],
                         "correct": None if ex.label is None else int(labels[best] == ex.label),
                         "nll_prediction": round(nll[best], 6),
                         "nll_label": None if ex.label is None else round(nll[labels.index(ex.label)], 6),
                         "shots": f.shots, "shots_requested": ecfg.shots, "truncated": int(f.truncated),
                         "prompt_tokens": len(f.ids)})
        return rows

    start = time.time()
    rows = run_batches(ctx, [len(e.text) for e in data.examples], score, f"{data.task.title} {split} {ecfg.shots}-shot")
    if rows is None:
        return
    scored = [r["correct"] for r in rows if r["correct"] is not None]
    metrics = {"accuracy": sum(scored) / len(scored) if scored else None}
    meta = task_meta(ctx, data.task.title, split, str(data.path), scoring="label-word perplexity",
                     label_words=data.words, label_tokens={l: tok.convert_ids_to_tokens(c) for l, c in zip(labels, continuations)},
                     on_overflow=ecfg.on_overflow, skipped_unlabeled=data.skipped, seconds=round(time.time() - start, 2))
    write_task_reports(ctx.run_dir, meta, metrics, rows)
    accuracy = "-" if metrics["accuracy"] is None else f"{100 * metrics['accuracy']:.1f}%"
    print(f"[eval] {data.task.title} {split} {ecfg.shots}-shot: {len(rows)} examples, accuracy {accuracy} -> "
          f"{ctx.run_dir / 'results.md'}", flush=True)


@dataclass
class GenerationSet:
    title: str
    path: str
    items: list  # hpcllm.eval.generation.GenItem
    encode: Callable  # an item's prompt -> token ids
    f1: Callable  # (answers, prediction) -> 0..1
    stops: set  # token ids that end an answer


def load_generation_set(ctx: StageContext) -> GenerationSet:
    """CMRC2018 (plain prompt, or the family's chat format with eval.chat_format) or an SFT test set (in the
    model's prompt format, as it was trained); answers end at eos or a special token of the chat format."""
    from hpcllm.eval import generation as gen

    cfg, ecfg, tok = ctx.cfg, ctx.cfg.eval, ctx.tokenizer
    specials = OmegaConf.to_container(cfg.model.special_tokens)
    cmrc = ecfg.benchmark == "cmrc2018"
    chat_format = cfg.model.prompt_format if (ecfg.chat_format or not cmrc) else None
    chat = ChatEncoder(tok, chat_format, specials) if chat_format else None
    stops = {tok.eos_token_id} | (set(chat.special_ids.values()) if chat else set())
    if cmrc:
        path = gen.cmrc_file(ecfg.data_dir or SAMPLE_DIR / "cmrc2018", ecfg.split or "dev")
        encode = (lambda text: chat.encode(user_turn(text))) if chat else (lambda text: encode_plain(tok, text))
        return GenerationSet("CMRC2018", str(path), gen.load_cmrc(path), encode, gen.cmrc_f1, stops)
    spec = ecfg.data_dir or str(SAMPLE_DIR / "sft" / "test.jsonl")
    plain = lambda c: encode_plain(tok, "\n".join(t.content + (f"\n{t.input}" if t.input else "")
                                                  for t in c.turns if t.role == "user") + "\n")
    return GenerationSet("SFT test set", spec, gen.load_sft_records(spec), chat.encode if chat else plain,
                         gen.overlap_f1, stops)


def evaluate_generation(ctx: StageContext) -> None:
    """Greedy answers scored by F1 and EM: CMRC2018 (the official metric) or an SFT test set (task F1)."""
    from hpcllm.eval.generation import exact_match, greedy_generate

    cfg, ecfg, tok = ctx.cfg, ctx.cfg.eval, ctx.tokenizer
    try:
        gs = load_generation_set(ctx)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    items = gs.items
    max_len = cfg.model.max_positions - ecfg.max_new_tokens
    if max_len < 1:
        raise ConfigError(f"eval.max_new_tokens={ecfg.max_new_tokens} leaves no room for a prompt in "
                          f"model.max_positions={cfg.model.max_positions}")
    prompts = [gs.encode(item.prompt) for item in items]
    partitioned = (ctx.run_dir / "ds_config_eval.json").is_file()
    model, device = load_eval_model(ctx), device_of(ctx)

    def score(batch):
        ids = [prompts[i][-max_len:] for i in batch]
        out = greedy_generate(model, ids, tok.pad_token_id, sorted(gs.stops), ecfg.max_new_tokens, device, partitioned)
        rows = []
        for i, kept, tokens in zip(batch, ids, out):
            text = tok.decode(tokens, skip_special_tokens=True)
            text = (text.split("\n")[0] if ecfg.benchmark == "cmrc2018" else text).strip()
            item = items[i]
            rows.append({"index": i, "id": item.id, "prediction": text, "answers": " | ".join(item.answers),
                         "f1": gs.f1(item.answers, text), "em": exact_match(item.answers, text),
                         "prompt_tokens": len(kept), "truncated": int(len(kept) < len(prompts[i])),
                         "new_tokens": len(tokens), "source": item.source})
        return rows

    start = time.time()
    rows = run_batches(ctx, [len(p) for p in prompts], score, f"{gs.title} generation")
    if rows is None:
        return
    metrics = {"f1": sum(r["f1"] for r in rows) / len(rows), "em": sum(r["em"] for r in rows) / len(rows)}
    meta = task_meta(ctx, gs.title, (ecfg.split or "dev") if ecfg.benchmark == "cmrc2018" else None, gs.path,
                     scoring="greedy generation, " + ("CMRC2018's official F1/EM" if ecfg.benchmark == "cmrc2018"
                                                      else "token-overlap F1 and EM"),
                     max_new_tokens=ecfg.max_new_tokens, seconds=round(time.time() - start, 2))
    meta["shots"] = 0
    write_task_reports(ctx.run_dir, meta, metrics, rows)
    print(f"[eval] {gs.title}: {len(rows)} answers, F1 {100 * metrics['f1']:.1f}, EM {100 * metrics['em']:.1f} -> "
          f"{ctx.run_dir / 'results.md'}", flush=True)


def evaluate_perplexity(ctx: StageContext) -> None:
    """Token-weighted mean NLL of the learned tokens (labels != -100) of a memmap dataset, and its exp."""
    from hpcllm.data import MemmapDataset

    split = "eval" if ctx.data.get("eval") else "train"
    path = ctx.data.get(split)  # derive() checked that data.eval or data.train is set
    ds = MemmapDataset(path)
    if ds.kind not in ("pretrain", "sft"):
        raise ConfigError(f"data.{split}={path} holds {ds.kind} data; perplexity needs pretrain or sft data")
    model, device = load_eval_model(ctx), device_of(ctx)
    bs, n = ctx.cfg.eval.batch_size, len(ds)
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for start, filler in _progress(rank_share(range(0, n, bs), ctx), ctx.dist.is_main, f"perplexity {split}"):
            rows = ds.rows(start, min(start + bs, n))
            mask = torch.from_numpy(rows["attention_mask"].astype("int64"))
            width = int(mask.sum(-1).max())  # rows are right-padded: drop columns no row uses
            ids = torch.from_numpy(rows["input_ids"].astype("int64"))[:, :width]
            labels = torch.from_numpy(rows["labels"].astype("int64"))[:, :width] if "labels" in rows else ids
            mask = mask[:, :width]
            labels = labels.masked_fill(mask == 0, -100)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            if filler:
                continue
            targets = labels[:, 1:].to(device)
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100,
                                                     reduction="sum").item()
            tokens += int((targets != -100).sum())
    nll, tokens = all_reduce([nll, float(tokens)])
    if ctx.dist.is_main:
        mean = nll / tokens if tokens else float("nan")
        result = {"benchmark": "perplexity", "title": "Perplexity", "model": ctx.cfg.model.name, "model_path": ctx.cfg.model.path,
                  "data": str(path), "split": split, "rows": n, "tokens": int(tokens), "mean_nll": mean,
                  "perplexity": math.exp(min(mean, 50.0))}
        (ctx.run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (ctx.run_dir / "results.md").write_text(
            f"# Perplexity: {ctx.cfg.model.name}\n\n| Data | Tokens | Mean NLL | Perplexity |\n|---|---:|---:|---:|\n"
            f"| {path} | {int(tokens)} | {mean:.4f} | {result['perplexity']:.2f} |\n")
        print(f"[eval] perplexity {result['perplexity']:.2f} over {int(tokens)} tokens -> {ctx.run_dir / 'results.json'}",
              flush=True)
