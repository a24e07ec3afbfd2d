"""method=reward|dpo|ppo as real jobs (`python launch.py`, 2 CPU ranks): they learn, a run stopped
by SIGUSR1 resumes where it stopped with the same losses as an uninterrupted run, and PPO's and DPO's
extra models run under ZeRO profiles of their own."""
import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest

from hpcllm.models.value_head import load_reward_model

pytestmark = pytest.mark.e2e
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]

# Each method's runs: an eval split for the preference methods, so eval accuracy is logged.
OVERRIDES = {
    "reward": ["data.eval_fraction=0.1", "train.eval_every=10"],
    "dpo": ["data.eval_fraction=0.1", "train.eval_every=10"],
    "ppo": [],
}
STOP_AT_STEP = 7  # odd: PPO stops in the middle of a rollout (2 optimizer steps each)


def launch(run_dir, method, *overrides):
    return subprocess.Popen([sys.executable, "launch.py", f"method={method}", f"hydra.run.dir={run_dir}",
                             *OVERRIDES[method], *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc, expected_code=0) -> str:
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()  # its ranks die with it (PDEATHSIG): no hung job outlives the test
        raise
    assert proc.returncode == expected_code, out[-4000:]
    return out


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir) -> dict:
    """step -> the (last) training row of that step."""
    return {row["step"]: row for row in metrics(run_dir) if "loss" in row}


def run_to_end(run_dir, method, *overrides) -> list[dict]:
    finish(launch(run_dir, method, *overrides))
    return metrics(run_dir)


def run_interrupted_then_resumed(run_dir, method, *overrides) -> tuple[int, str]:
    """SIGUSR1 to the launcher once step STOP_AT_STEP is logged; the job checkpoints and exits 3."""
    proc = launch(run_dir, method, *overrides)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and any(r.get("step", 0) >= STOP_AT_STEP for r in metrics(run_dir)):
            proc.send_signal(signal.SIGUSR1)
            break
        time.sleep(0.2)
    finish(proc, expected_code=3)
    stopped_at = max(r["step"] for r in metrics(run_dir))
    return stopped_at, finish(launch(run_dir, method, *overrides))


@pytest.fixture(scope="module", params=["reward", "dpo", "ppo"])
def runs(request, tmp_path_factory):
    """(method, metrics of an uninterrupted run, its run dir, an interrupted+resumed run's dir, stop step, log)."""
    method = request.param
    root = tmp_path_factory.mktemp(method)
    full = root / "full run"
    rows = run_to_end(full, method)
    resumed = root / "resumed run"
    stopped_at, log = run_interrupted_then_resumed(resumed, method)
    return method, rows, full, resumed, stopped_at, log


def test_the_model_learns(runs):
    method, rows, full, *_ = runs
    train = [r for r in rows if "loss" in r]
    assert (full / "final" / "config.json").is_file()
    if method == "reward":
        assert sum(r["reward_accuracy"] for r in train[-10:]) / 10 > 0.8
        assert [r for r in rows if "eval_reward_accuracy" in r][-1]["eval_reward_accuracy"] > 0.8
        assert load_reward_model(full / "final").value_head.weight.shape[0] == 1
    elif method == "dpo":
        assert sum(r["reward_accuracy"] for r in train[-10:]) / 10 > 0.8
        assert train[-1]["reward_margin"] > train[0]["reward_margin"]
        assert [r for r in rows if "eval_reward_accuracy" in r][-1]["eval_reward_accuracy"] > 0.8
    else:
        first, last = train[0]["mean_reward"], sum(r["mean_reward"] for r in train[-8:]) / 8
        assert last > first + 0.05, [r["mean_reward"] for r in train]
        assert max(r["kl"] for r in train) < 20  # nats over 16 generated tokens
        assert {"returns", "clip_fraction", "value_loss", "generation_length"} <= train[-1].keys()
        assert load_reward_model(full / "final" / "critic").value_head.weight.shape[0] == 1


def test_a_stopped_run_resumes_exactly(runs):
    method, rows, full, resumed, stopped_at, log = runs
    assert f"resumed from" in log and f"step_{stopped_at:08d}" in log
    expected, got = train_rows(full), train_rows(resumed)
    assert sorted(got) == sorted(expected)
    for step in expected:
        for key in ("loss", "reward_accuracy", "mean_reward", "kl"):
            if key in expected[step]:
                assert got[step][key] == pytest.approx(expected[step][key], rel=1e-4, abs=1e-6), (step, key)


@pytest.mark.parametrize("method", ["reward", "dpo", "ppo"])
def test_lora_on_one_rank(tmp_path, method):
    overrides = ["method.adapter=lora", "hw.gpus_per_node=1", "train.max_steps=4"]
    if method == "dpo":
        overrides.append("method.dpo.precompute_reference=true")
    rows = run_to_end(tmp_path, method, *overrides)
    assert len([r for r in rows if "loss" in r]) == 4
    assert (tmp_path / "final" / "config.json").is_file() or (tmp_path / "final" / "adapter_config.json").is_file()
    if method == "dpo":
        assert (tmp_path / "data" / "train_reference_logps.npy").is_file()


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A real reward-model export (method=reward, one rank, a few steps), for PPO's reward model."""
    run = tmp_path_factory.mktemp("reward_model") / "run"
    run_to_end(run, "reward", "hw.gpus_per_node=1", "train.max_steps=3")
    return run / "final"


def partition_report(log: str, role: str) -> tuple[int, int, str]:
    """(parameters on rank 0, all parameters, device) from the frozen engine's report line."""
    match = re.search(rf"hpcllm: {role}: ZeRO-3 partitioned, ([\d,]+) of its ([\d,]+) parameters held by rank 0, "
                      r"on (\w+)", log)
    assert match, f"no partition report for {role}:\n{log[-3000:]}"
    return int(match[1].replace(",", "")), int(match[2].replace(",", "")), match[3]


def test_ppo_models_each_under_their_own_zero_profile(tmp_path, reward_model_dir):
    """Actor under zero=stage3 (built under zero.Init), critic trained in its own ZeRO-2 engine with its
    optimizer offloaded (DeepSpeed's CPU Adam, compiled on first use), reference
    (stage3_offload) and reward model (stage3) partitioned in optimizer-less engines; it learns nothing
    wrong at the start (KL 0: the reference is the starting actor) and resumes exactly, critic included."""
    overrides = ["zero=stage3", "method.ppo.critic_zero=stage2_offload", "method.ppo.reference_zero=stage3_offload",
                 "method.ppo.reward_zero=stage3", f"method.ppo.reward_model={reward_model_dir}", "train.max_steps=10"]
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = launch(full, "ppo", *overrides)
    log = finish(proc)
    for role in ("reference", "reward"):
        local, total, _ = partition_report(log, role)
        assert total // 2 <= local < total  # half of each partitioned tensor (rounded up) on each of 2 ranks
    assert partition_report(log, "reference")[2] == "cpu"
    configs = {name: json.loads((full / f"ds_config{name}.json").read_text())["zero_optimization"]
               for name in ("", "_critic", "_reference", "_reward")}
    assert [configs[n]["stage"] for n in ("", "_critic", "_reference", "_reward")] == [3, 2, 3, 3]
    assert configs["_reference"]["offload_param"]["device"] == "cpu" and "offload_param" not in configs["_reward"]
    assert configs["_critic"]["offload_optimizer"]["device"] == "cpu" and "offload_optimizer" not in configs[""]
    rows = train_rows(full)
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert {"critic_lr", "critic_grad_norm"} <= rows[10].keys()
    assert (full / "checkpoints" / "step_00000010" / "critic").is_dir()
    assert load_reward_model(full / "final" / "critic").value_head.weight.shape[0] == 1

    stopped_at, log = run_interrupted_then_resumed(resumed, "ppo", *overrides)
    assert f"step_{stopped_at:08d}" in log
    got = train_rows(resumed)
    assert sorted(got) == sorted(rows)
    for step in rows:
        for key in ("loss", "value_loss", "mean_reward", "kl"):
            assert got[step][key] == pytest.approx(rows[step][key], rel=1e-4, abs=1e-6), (step, key)


def test_dpo_under_zero3_partitions_its_reference(tmp_path):
    """zero=stage3 with zero.Init (the default) and a full fine-tuned policy: the reference is a partitioned
    copy of the starting policy, so the first loss is exactly log 2."""
    log = finish(launch(tmp_path, "dpo", "zero=stage3", "train.max_steps=3"))
    local, total, _ = partition_report(log, "reference")
    assert total // 2 <= local < total
    rows = train_rows(tmp_path)
    assert rows[1]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[3]["loss"] < rows[1]["loss"]
