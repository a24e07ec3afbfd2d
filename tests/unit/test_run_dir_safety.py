"""Nothing lost, nothing silently wrong (issue 13): checkpoints never deleted before a newer one is
complete, damaged ones skipped, resume refusing another model/data, a lock per run directory.

Real files in tmp_path; the DeepSpeed engine is a stand-in that writes its shard file (the real
engine is exercised in tests/e2e/test_train.py), the optimizer and schedule are real torch ones."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcllm.config import compose
from hpcllm.config.recipes import apply_recipe
from hpcllm.launch import lock as run_lock
from hpcllm.train import resume as rules
from hpcllm.train.checkpoint import (COMPLETE, Checkpointer, apply_optimizer_settings, complete_checkpoints, damage,
                                     optimizer_settings)
from hpcllm.train.schedule import lr_scheduler_factory

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def outside_any_launch(monkeypatch):
    """As a fresh shell: no lock token inherited, no Slurm job (acquire() sets the token; undone after)."""
    monkeypatch.setenv(run_lock.TOKEN_ENV, "")
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)


class FakeEngine:
    """Writes one file per save like a DeepSpeed engine writes its shards; ``fail`` kills the save half-way."""

    def __init__(self, fail=False):
        self.fail = fail

    def save_checkpoint(self, root, tag, client_state=None, save_latest=False):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "mp_rank_00_model_states.pt"), "wb") as f:
            f.write(os.urandom(1000))
            if self.fail:
                raise KeyboardInterrupt("killed during the save")


def save(root, step, fail=False, keep_last=2):
    checkpointer = Checkpointer(root, 0, keep_last, True, 0, records={"config.yaml": "seed: 1\n"})
    return checkpointer.save({"model": FakeEngine(fail)}, {"step": step}, expected_bytes=1)


# -- item 2: a complete checkpoint is never deleted before a newer one is complete --------------

def test_a_kill_while_rewriting_a_step_keeps_its_complete_checkpoint(tmp_path):
    first = save(tmp_path, 12)
    weights = (first / "mp_rank_00_model_states.pt").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 12, fail=True)  # the same step saved again (a relaunch), killed half-way
    assert complete_checkpoints(tmp_path) == [first]
    assert (first / "mp_rank_00_model_states.pt").read_bytes() == weights
    again = save(tmp_path, 12)  # the next save replaces it and clears the leftover
    assert complete_checkpoints(tmp_path) == [again] and sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    assert (again / "mp_rank_00_model_states.pt").read_bytes() != weights


def test_an_interrupted_swap_still_leaves_a_complete_checkpoint(tmp_path):
    old = save(tmp_path, 8)
    (tmp_path / "step_00000008.next").mkdir()
    (tmp_path / "step_00000008.next" / COMPLETE).write_text("step_00000008\n")
    old.rename(tmp_path / "step_00000008.replaced")  # killed between the two renames of the swap
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000008.next"]
    save(tmp_path, 16)  # the next save settles it under its own name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000008", "step_00000016"]
    assert (tmp_path / "step_00000008" / COMPLETE).is_file()


def test_resuming_an_earlier_checkpoint_sets_the_newer_ones_aside(tmp_path, capsys):
    """resume=checkpoints/step_4 while step_8 exists: a later resume=auto must not take step_8 of the
    abandoned continuation, nor may pruning mix the two."""
    earlier, newer = save(tmp_path, 4), save(tmp_path, 8)
    moved = Checkpointer(tmp_path, 0, 2, True, 0).set_aside_newer(earlier)
    assert complete_checkpoints(tmp_path) == [earlier]
    assert [p.name for p in moved] == [newer.name] and (moved[0] / COMPLETE).is_file()
    assert "moved aside" in capsys.readouterr().out
    assert Checkpointer(tmp_path, 0, 2, True, 0).set_aside_newer(tmp_path / "elsewhere" / "step_00000001") == []
    assert Checkpointer(tmp_path, 0, 2, True, 0).set_aside_newer(tmp_path / "exported_by_hand") == []


# -- item 12: sizes and checksums recorded at save, checked on resume, fallback saying so ------

def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
    save(tmp_path, 4)
    latest = save(tmp_path, 8)
    manifest = json.loads((latest / "manifest.json").read_text())["files"]
    assert manifest["mp_rank_00_model_states.pt"]["size"] == 1000 and "sha256" in manifest["state.json"]
    checkpointer = Checkpointer(tmp_path, 0, 2, True, 0)
    assert checkpointer.latest_sound() == latest and damage(latest) == []

    shard = latest / "mp_rank_00_model_states.pt"
    shard.write_bytes(b"not a pickle" + shard.read_bytes()[12:])  # same size, other content
    assert damage(latest) == ["mp_rank_00_model_states.pt does not have the content that was saved (sha256 differs)"]
    assert checkpointer.latest_sound().name == "step_00000004"
    out = capsys.readouterr().out
    assert f"checkpoint {latest} is damaged" in out and "previous complete checkpoint step_00000004" in out

    (tmp_path / "step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    assert "has 5 bytes, 1000 were saved" in damage(tmp_path / "step_00000004")[0]
    with pytest.raises(RuntimeError, match="every complete checkpoint .* is damaged"):
        checkpointer.latest_sound()  # never start again from scratch over them


# -- item 4: what may change is applied; what may not is refused naming the key ----------------

def test_a_resume_applies_the_new_lr_and_schedule_not_the_checkpoints():
    """What DeepSpeed's load_checkpoint does to the optimizer and LambdaLR (real torch objects)."""
    def engine(lr, max_steps):
        cfg = compose(["method=sft", f"method.lr={lr}"]).method
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))], lr=cfg.lr)
        return type("Engine", (), {"optimizer": optimizer,
                                   "lr_scheduler": lr_scheduler_factory(cfg, max_steps)(optimizer)})()

    old = engine(1e-3, 10)
    for _ in range(4):
        old.optimizer.param_groups[0]["params"][0].grad = torch.ones(2)
        old.optimizer.step()
        old.lr_scheduler.step()
    new = engine(5e-4, 20)
    settings = optimizer_settings(new)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.lr_scheduler.load_state_dict(old.lr_scheduler.state_dict())
    apply_optimizer_settings(new, settings)
    expected = 5e-4 * new.lr_scheduler.lr_lambdas[0](4)
    assert new.lr_scheduler.lr_lambdas[0].total_steps == 20 and new.lr_scheduler.last_epoch == 4
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(expected)
    assert int(new.optimizer.state_dict()["state"][0]["step"]) == 4  # the moments stay the checkpoint's


def test_config_changes_are_sorted_into_refused_and_applied():
    old = compose(["method=sft"])
    new = compose(["method=sft", "method.lr=3e-4", "method.micro_batch_size=4", "train.max_steps=50",
                   "train.log_every=5", "model=tiny_qwen2", "data.train=/other.jsonl", "method.seq_len=64",
                   "hw.nodes=2", "zero=stage3"])
    for cfg in (old, new):  # as every run directory's config.yaml: the recipe's values filled in
        apply_recipe(cfg, 2)
    refusals, changes = rules.compare_configs(old, new)
    refused = {line.split(":")[0] for line in refusals}
    assert {"model.name", "data.train", "method.seq_len", "hw.nodes", "zero.stage"} <= refused
    assert not {"method.lr", "method.micro_batch_size", "train.max_steps"} & refused
    assert changes["method.lr"] == [1e-3, 3e-4] and changes["train.max_steps"] == [-1, 50]
    assert "train.log_every" in changes


def test_changes_are_logged_and_recorded(tmp_path, capsys):
    rules.log_changes(tmp_path, 40, {"method.lr": [1e-3, 3e-4]})
    assert "resuming at step 40 with changes" in capsys.readouterr().out
    entry = json.loads((tmp_path / rules.CHANGES_LOG).read_text())
    assert entry["resumed_at_step"] == 40 and entry["changes"] == {"method.lr": [1e-3, 3e-4]}


# -- items 2, 3, 4, 6 through launch.py, before anything in the run directory changes -----------

def launch(run_dir, *overrides):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), f"hydra.run.dir={run_dir}", "train.max_steps=12",
                           *overrides], cwd=ROOT, capture_output=True, text=True, timeout=180)


def write_memmap_meta(path, sha="a" * 64, seq_len=128):
    path.mkdir(parents=True, exist_ok=True)
    (path / "meta.json").write_text(json.dumps({
        "inputs": [{"path": "/corpus.jsonl", "sha256": sha}], "tokenizer": {"name": "demo", "hash": "t1"}, "seq_len": seq_len,
        "kind": "sft", "mode": "truncate", "num_samples": 100, "seed": 1234}))


@pytest.fixture
def finished_run(tmp_path):
    """A run directory as a finished 12-step run leaves it (config from a real dry run, a checkpoint
    recording it and the memmap it read, final/)."""
    run_dir, memmap = tmp_path / "run", tmp_path / "memmap"
    write_memmap_meta(memmap)
    out = launch(run_dir, f"data.train={memmap}", "dry_run=true")
    assert out.returncode == 0, out.stderr
    ckpt = run_dir / "checkpoints" / "step_00000012"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 12, "max_steps": 12, "consumed_samples": 48}))
    (ckpt / rules.CONFIG_RECORD).write_text((run_dir / "config.yaml").read_text())
    (ckpt / rules.DATA_RECORD).write_text(json.dumps(rules.data_record({"train": str(memmap)})))
    (ckpt / COMPLETE).write_text("step_00000012\n")
    (run_dir / "final").mkdir()
    return run_dir, memmap


def snapshot(run_dir):
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(run_dir.rglob("*")) if p.name != "run.lock" and ".hydra" not in p.parts}


def test_relaunching_a_finished_run_leaves_it_untouched(finished_run):
    run_dir, memmap = finished_run
    before = snapshot(run_dir)
    out = launch(run_dir, f"data.train={memmap}")
    assert out.returncode == 0, out.stderr
    assert "is complete: trained to step 12" in out.stdout and "A larger train.max_steps continues it" in out.stdout
    assert snapshot(run_dir) == before
    assert not (run_dir / "run.lock").exists()  # released at exit
    more = launch(run_dir, f"data.train={memmap}", "train.max_steps=20", "dry_run=true")
    assert more.returncode == 0 and "train:\n  max_steps: 20" in (run_dir / "config.yaml").read_text()


def test_a_finished_run_without_checkpoints_is_not_trained_over(finished_run):
    """Checkpoints deleted to save disk: the next launch would start at step 1 and overwrite final/."""
    run_dir, memmap = finished_run
    shutil.rmtree(run_dir / "checkpoints")
    before = snapshot(run_dir)
    out = launch(run_dir, f"data.train={memmap}", "dry_run=true")
    assert out.returncode != 0 and "holds the final/ export of an earlier run" in out.stderr
    assert snapshot(run_dir) == before


def test_resume_never_into_an_earlier_runs_directory_is_refused(finished_run):
    run_dir, memmap = finished_run
    before = snapshot(run_dir)
    out = launch(run_dir, f"data.train={memmap}", "resume=never", "dry_run=true")
    assert out.returncode != 0
    assert "holds checkpoints of an earlier run" in out.stderr
    assert "another hydra.run.dir" in out.stderr and "resume=auto" in out.stderr
    assert snapshot(run_dir) == before


def test_resume_with_another_model_or_data_is_refused_naming_the_key(finished_run, tmp_path):
    run_dir, memmap = finished_run
    before = snapshot(run_dir)
    other = tmp_path / "other_memmap"
    write_memmap_meta(other, seq_len=64)  # data that fits the new seq_len: the resume check is what refuses
    out = launch(run_dir, f"data.train={other}", "method.seq_len=64", "train.max_steps=20", "dry_run=true")
    assert out.returncode != 0
    assert f"data.train: '{memmap}' -> '{other}'" in out.stderr and "method.seq_len: 128 -> 64" in out.stderr
    assert snapshot(run_dir) == before  # config.yaml still says what ran


def test_a_memmap_replaced_under_the_same_path_is_refused(finished_run):
    run_dir, memmap = finished_run
    write_memmap_meta(memmap, sha="b" * 64)  # another corpus prepared into the same directory
    out = launch(run_dir, f"data.train={memmap}", "train.max_steps=20", "dry_run=true")
    assert out.returncode != 0
    assert f"the train memmap {memmap} is not the one this run trained on" in out.stderr
    assert "inputs_sha256" in out.stderr


# -- item 5: one launch at a time per run directory --------------------------------------------

def test_a_second_launch_into_a_running_run_dir_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({
            "host": socket.gethostname(), "pid": holder.pid, "slurm_job_id": None, "started": "now", "token": "x"}))
        out = launch(tmp_path, "dry_run=true")
        assert out.returncode != 0
        assert f"is in use by another launch (host {socket.gethostname()}, pid {holder.pid}" in out.stderr
        assert not (tmp_path / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    out = launch(tmp_path, "dry_run=true")  # the holder is gone: its lock is stale
    assert out.returncode == 0, out.stderr
    assert "was left by a run that is gone" in out.stdout and (tmp_path / "config.yaml").is_file()


def test_lock_holder_details_and_release(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    lock = run_lock.acquire(tmp_path, release_at_exit=False)
    holder = json.loads((tmp_path / "run.lock").read_text())
    assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid()
    assert holder["slurm_job_id"] == "4242"
    assert run_lock.acquire(tmp_path, release_at_exit=False).owned is False  # this process's ranks join it
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_requeued_slurm_job_continues_and_another_job_is_refused(tmp_path, monkeypatch):
    run_lock.hand_to_slurm_job(tmp_path, "777")  # written by the submitter
    monkeypatch.setattr(run_lock, "slurm_job_active", lambda job_id: job_id == "777")
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(run_lock.RunDirLocked, match=r"Slurm job 777.*scancel 777"):
        run_lock.acquire(tmp_path, release_at_exit=False)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the job itself, started or requeued: the same run
    lock = run_lock.acquire(tmp_path, release_at_exit=False)
    assert lock.owned and json.loads(lock.path.read_text())["pid"] == os.getpid()
    monkeypatch.setenv(run_lock.TOKEN_ENV, "")
    monkeypatch.setattr(run_lock, "slurm_job_active", lambda job_id: False)  # the job ended
    monkeypatch.setenv("SLURM_JOB_ID", "900")
    assert run_lock.acquire(tmp_path, release_at_exit=False).owned


def test_a_second_launch_inside_the_same_slurm_allocation_is_refused(tmp_path, monkeypatch):
    """salloc: both launches see the same SLURM_JOB_ID, yet only a requeued job (restart count up) or
    the submitted job taking over its submitter's lock continues."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        monkeypatch.setattr(run_lock, "slurm_job_active", lambda job_id: True)
        monkeypatch.setenv("SLURM_JOB_ID", "55")
        monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
        (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                       "slurm_job_id": "55", "slurm_restart": "0", "token": "w"}))
        with pytest.raises(run_lock.RunDirLocked, match=f"pid {holder.pid}, Slurm job 55"):
            run_lock.acquire(tmp_path, release_at_exit=False)
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the job was requeued: that run has ended
        assert run_lock.acquire(tmp_path, release_at_exit=False).owned
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_on_another_host_is_not_taken_over(tmp_path, monkeypatch):
    (tmp_path / "run.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y"}))
    with pytest.raises(run_lock.RunDirLocked, match="cannot be checked from here.*delete"):
        run_lock.acquire(tmp_path, release_at_exit=False)


def test_a_reused_pid_is_not_the_holder(tmp_path, monkeypatch):
    (tmp_path / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                   "pid_start": "1", "token": "z"}))
    assert run_lock.acquire(tmp_path, release_at_exit=False).owned


def test_a_rank_started_directly_takes_the_lock_or_stops(tmp_path, monkeypatch):
    """torchrun/srun without launch.py: rank 0 takes the lock itself; a held one stops every rank."""
    from hpcllm.distributed import DistEnv
    from hpcllm.launch.worker import _run_lock

    rank0 = DistEnv(0, 0, 1, "127.0.0.1", 29500)
    lock = _run_lock(tmp_path, rank0)
    assert lock.owned and json.loads(lock.path.read_text())["pid"] == os.getpid()
    monkeypatch.setenv(run_lock.TOKEN_ENV, "")  # a second, unrelated start while this one runs
    with pytest.raises(run_lock.RunDirLocked, match=f"pid {os.getpid()}"):
        _run_lock(tmp_path, rank0)
    lock.release()
    assert not lock.path.exists()
