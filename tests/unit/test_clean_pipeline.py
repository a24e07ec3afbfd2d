"""The cleaning run as a whole (local executor, in-process): dedup across shards, resuming, SFT sets,
the presets and config errors, and memmap_gen reading the cleaned output."""
import json
import os
import sys
from pathlib import Path

import pytest

from hpcllm.clean import CleanConfigError, run_clean

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "tests" / "unit" / "data" / "clean"))
import clean as clean_tool  # noqa: E402
from make_fixtures import ZH_KEEP  # noqa: E402
from test_clean_rules import read_jsonl_zst  # noqa: E402


def write_shards(folder: Path, shards) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, records in enumerate(shards):
        with open(folder / f"part_{i}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return folder


def clean(*overrides: str) -> dict:
    return run_clean(clean_tool.compose_config(["workers=1", *overrides]))


def ids(pattern: str) -> list:
    return sorted(r["id"] for r in read_jsonl_zst(pattern))


def test_exact_copies_across_shards_are_removed_once_and_near_duplicates_found(tmp_path):
    near = ZH_KEEP[2].replace("耐心", "恒心").replace("错误", "错")  # a few characters changed
    shards = [[{"id": "a0", "text": ZH_KEEP[0]}, {"id": "b", "text": ZH_KEEP[2]}],
              [{"id": "a1", "text": ZH_KEEP[0]}, {"id": "c", "text": ZH_KEEP[3]}],
              [{"id": "a2", "text": ZH_KEEP[0] + "  "}, {"id": "b-near", "text": near}]]
    inp = write_shards(tmp_path / "in", shards)
    report = clean(f"input={inp}", f"output={tmp_path / 'out'}")
    assert ids(str(tmp_path / "out" / "data" / "*")) == ["a0", "b", "c"]
    assert ids(str(tmp_path / "out" / "excluded" / "exact_dedup" / "*")) == ["a1", "a2"]
    assert ids(str(tmp_path / "out" / "excluded" / "minhash_dedup" / "*")) == ["b-near"]
    assert {r["rule"]: r["documents"] for r in report["rules"]} == {"exact_dedup": 2, "minhash_dedup": 1}

    # The MinHash parameters are the user's: without MinHash the near copy stays.
    report = clean(f"input={inp}", f"output={tmp_path / 'out2'}", "minhash.enabled=false")
    assert ids(str(tmp_path / "out2" / "data" / "*")) == ["a0", "b", "b-near", "c"]
    assert not (tmp_path / "out2" / "work" / "minhash_sigs").exists()


def test_a_rerun_resumes_and_redoes_only_an_unfinished_task(tmp_path):
    inp = write_shards(tmp_path / "in", [[{"id": "a", "text": ZH_KEEP[0]}], [{"id": "b", "text": ZH_KEEP[1]},
                                                                            {"id": "a-copy", "text": ZH_KEEP[0]}]])
    out = tmp_path / "out"
    first = clean(f"input={inp}", f"output={out}")
    filtered = out / "work" / "filtered" / "00000.jsonl.zst"
    stamp = filtered.stat().st_mtime_ns
    # Task 1 of the last stage was killed: no completion marker, its output half written.
    (out / "logs" / "minhash_filter" / "completions" / "00001").unlink()
    (out / "data" / "00001.jsonl.zst").write_bytes(b"partial")
    second = clean(f"input={inp}", f"output={out}", "workers=2")  # run-only settings may change
    assert filtered.stat().st_mtime_ns == stamp  # the finished stages were not redone
    assert ids(str(out / "data" / "*")) == ["a", "b"]
    assert second["rules"] == first["rules"] and second["output"] == first["output"]

    with pytest.raises(CleanConfigError, match="different config.*length"):
        clean(f"input={inp}", f"output={out}", "length.min_chars=10")


SFT = [
    {"id": "s1", "instruction": "请把下面这段关于天气和出行安排的中文句子翻译成英文，并保持原来的语气。", "input": "明天会下雨，我们改天再去爬山吧。",
     "output": "It will rain tomorrow, so let's go hiking another day."},
    {"id": "s1-same", "instruction": "请把下面这段关于天气和出行安排的中文句子翻译成英文，并保持原来的语气。", "input": "明天会下雨，我们改天再去爬山吧。",
     "output": "Tomorrow it rains; let us climb another day."},
    {"id": "s1-near", "instruction": "请把下面这段关于天气和出行安排的中文句子翻译为英文，并保持原来的语气。", "input": "明天会下雨，我们改天再去爬山吧！",
     "output": "Rain tomorrow, hiking later."},
    {"id": "s2", "instruction": "Write a short poem about the sea.", "output": ""},
    {"id": "s3", "prompt": "用一句话解释什么是光合作用。", "response": "植物利用光能把二氧化碳和水变成有机物并释放氧气。" * 10},
    {"id": "s4", "type": "conversation", "rounds": [["ask", "你好，你是谁？"], ["ans", "我是一个语言模型助手。"]]},
    {"id": "s5", "instruction": "列出三种常见的水果。", "output": "苹果、香蕉和橙子。"},
]


def test_sft_dedups_prompts_counts_answers_and_feeds_memmap_gen(tmp_path):
    inp = write_shards(tmp_path / "in", [SFT[:4], SFT[4:]])
    out = tmp_path / "out"
    report = clean("preset=sft", f"input={inp}", f"output={out}", "sft.max_answer_chars=200")
    assert ids(str(out / "data" / "*")) == ["s1", "s4", "s5"]
    reasons = {r["rule"]: {k: v["documents"] for k, v in r["reasons"].items()} for r in report["rules"]}
    assert reasons == {"sft_answer": {"empty_answer": 1, "answer_too_long": 1},
                       "exact_dedup": {"exact_dedup": 1}, "minhash_dedup": {"minhash_dedup": 1}}
    kept = {r["id"]: r for r in read_jsonl_zst(str(out / "data" / "*"))}
    assert kept["s4"] == SFT[5] and kept["s1"] == SFT[0]  # records come out in their own shape

    from hpcllm.data import prepare_memmap

    meta = prepare_memmap(str(out / "data"), str(tmp_path / "mm"), "demo", 256, "truncate", "tiny_llama", kind="sft",
                          progress=False)
    assert meta["num_records"] == meta["num_records_used"] == 3 and meta["num_samples"] == 3


def test_semantic_dedup_without_a_model_path_is_refused(tmp_path):
    with pytest.raises(CleanConfigError, match="semantic_dedup.model_path"):
        clean("preset=sft", f"input={tmp_path}", f"output={tmp_path / 'o'}", "semantic_dedup.enabled=true")


@pytest.mark.parametrize("preset", ["zh_web", "en_web", "sft"])
def test_presets_compose_and_validate(preset, tmp_path):
    from hpcllm.clean.config import validate
    from hpcllm.clean.pipeline import build_stages

    cfg = clean_tool.compose_config([f"preset={preset}", "input=x", f"output={tmp_path}"])
    validate(cfg)
    names = [s.name for s in build_stages(cfg, 3)]
    assert names == ["filter", "exact_find", "exact_filter", "minhash_buckets", "minhash_cluster", "minhash_filter"]


@pytest.mark.parametrize("argv, message", [
    (["preset=zh_web", "input=x", "output=y", "lenght.min_chars=3"], "lenght"),
    (["preset=nope", "input=x", "output=y"], "preset='nope' is not one of en_web, sft, zh_web"),
    (["preset=zh_web", "output=y"], "missing input="),
])
def test_config_errors_name_the_key(argv, message):
    with pytest.raises(Exception, match=message):
        clean_tool.compose_config(argv)


def test_cli_reports_bad_input_and_refuses_a_foreign_output(tmp_path, capsys):
    assert clean_tool.main(["input=/no/such/dir", f"output={tmp_path / 'o'}"]) == 2
    assert "input='/no/such/dir' does not exist" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    inp = write_shards(tmp_path / "in", [[{"text": ZH_KEEP[0]}]])
    assert clean_tool.main([f"input={inp}", f"output={tmp_path / 'busy'}"]) == 2
    assert "is not a cleaning run" in capsys.readouterr().err
    assert os.path.exists(tmp_path / "busy" / "notes.txt")


def tiny_encoder(folder: Path) -> str:
    """A 1-layer BERT with random weights and the bundled demo tokenizer: it cannot judge meaning (a real
    run gives e.g. bge-small-zh), but equal prompts embed equally and different ones do not."""
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(ROOT / "hpcllm" / "data" / "demo_tokenizer" / "tokenizer.json"),
                                  pad_token="<pad>", unk_token="<unk>")
    tok.save_pretrained(folder)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    return str(folder)


def test_semantic_dedup_with_an_encoder_given_by_path(tmp_path):
    records = [{"id": f"q{i}", "instruction": text, "output": "好的。"} for i, text in
               enumerate(["介绍一下长城的历史。", "写一首关于春天的诗。", "介绍一下长城的历史。", "解释牛顿第一定律。"])]
    inp = write_shards(tmp_path / "in", [records[:2], records[2:]])
    report = clean("preset=sft", f"input={inp}", f"output={tmp_path / 'out'}", "exact_dedup.enabled=false",
                   "minhash.enabled=false", "semantic_dedup.enabled=true", "semantic_dedup.threshold=0.9999",
                   f"semantic_dedup.model_path={tiny_encoder(tmp_path / 'enc')}")
    assert ids(str(tmp_path / "out" / "data" / "*")) == ["q0", "q1", "q3"]
    assert ids(str(tmp_path / "out" / "excluded" / "semantic_dedup" / "*")) == ["q2"]
    assert {r["rule"]: r["documents"] for r in report["rules"]} == {"semantic_dedup": 1}


def test_slurm_script_and_blocked_jobs_without_a_cluster(tmp_path):
    from hpcllm.clean.pipeline import Layout, build_stages
    from hpcllm.clean.run import _doomed, _slurm

    cfg = clean_tool.compose_config(["input=x", f"output={tmp_path / 'o'}", "cluster=slurm", "slurm.account=proj",
                                     "slurm.array_parallelism=4"])
    stage = build_stages(cfg, 3)[0]
    ex = _slurm(stage, Layout(cfg.output), cfg, None)
    script = ex.get_launch_file_contents(ex.get_sbatch_args(3), "srun launch_pickled_pipeline x")
    assert "#SBATCH --array=0-2%4" in script and "#SBATCH --account=proj" in script
    assert "#SBATCH --kill-on-invalid-dep=yes" in script
    assert "--partition" not in script and "--qos" not in script  # the cluster's defaults
    assert f"export PATH={os.path.dirname(sys.executable)}:$PATH" in script  # datatrove's launcher of this env

    order = ["1", "2", "3", "4"]
    queued = {"2": ("PENDING", "DependencyNeverSatisfied"), "3": ("PENDING", "Dependency"), "4": ("PENDING", "Dependency")}
    assert _doomed(order, queued) == ["2", "3", "4"]
    assert _doomed(order, {"1": ("RUNNING", "None"), "2": ("PENDING", "Dependency")}) == []

    with pytest.raises(CleanConfigError, match="with cluster=slurm the path may hold only"):
        clean("input=x", f"output={tmp_path / 'with space'}", "cluster=slurm")


def test_gzip_and_zstd_inputs_bad_bytes_and_plain_output(tmp_path):
    import gzip

    import zstandard

    inp = tmp_path / "in"
    inp.mkdir()
    with gzip.open(inp / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "a", "text": ZH_KEEP[0]}, ensure_ascii=False) + "\n")
    line = (json.dumps({"id": "b", "text": ZH_KEEP[1]}, ensure_ascii=False) + "\n").encode()
    (inp / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(line + b'{"text": "\xff\xfe"}\n'))
    report = clean(f"input={inp}", f"output={tmp_path / 'out'}", "compression=none")
    kept = [json.loads(x) for p in sorted((tmp_path / "out" / "data").glob("*.jsonl")) for x in p.read_text().splitlines()]
    assert [r["id"] for r in kept] == ["a", "b"]
    bad = report["rules"][0]
    assert bad["rule"] == "record" and list(bad["reasons"]) == ["invalid_utf8"]
    assert bad["reasons"]["invalid_utf8"]["examples"][0]["source"].endswith("b.jsonl.zst:2")
