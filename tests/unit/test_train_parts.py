"""Loop components on their own: the LR schedule, checkpoint bookkeeping, the disk check."""
import json

import pytest

from hpcllm.train.checkpoint import COMPLETE, Checkpointer, DiskFullError, complete_checkpoints
from hpcllm.train.schedule import WarmupDecay


def test_warmup_then_cosine_to_min_ratio():
    f = WarmupDecay(warmup_steps=4, total_steps=104, kind="cosine", min_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(54) == pytest.approx(0.55)  # half way: 0.1 + 0.9 * 0.5
    assert f(104) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_linear_and_constant():
    assert WarmupDecay(0, 10, "linear", 0.0)(5) == pytest.approx(0.5)
    assert WarmupDecay(2, 10, "constant")(7) == 1.0


def make_checkpoint(root, step, complete=True, eval_loss=None):
    path = root / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "weights.pt").write_bytes(b"x" * 10)
    (path / "state.json").write_text(json.dumps({"step": step, "eval_loss": eval_loss}))
    if complete:
        (path / COMPLETE).write_text("done\n")
    return path


def test_only_complete_checkpoints_count(tmp_path):
    make_checkpoint(tmp_path, 10)
    make_checkpoint(tmp_path, 20)
    make_checkpoint(tmp_path, 30, complete=False)  # a save killed half-way
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_00000010", "step_00000020"]
    assert Checkpointer(tmp_path, 0, 2, True, 0).latest().name == "step_00000020"


def test_prune_keeps_last_k_and_best_and_drops_partial(tmp_path):
    for step in (10, 20, 30, 40):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 45, complete=False)
    Checkpointer(tmp_path, 0, keep_last=2, keep_best=True, min_free_gb=0)._prune(
        {"step": 40, "best_checkpoint": "step_00000010"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000010", "step_00000030", "step_00000040"]


def test_full_disk_stops_with_a_clear_message_before_writing(tmp_path, capsys):
    checkpointer = Checkpointer(tmp_path / "ckpt", 0, 2, True, min_free_gb=10**9)
    with pytest.raises(DiskFullError, match="not enough free disk"):
        checkpointer.save(engines={"model": None}, state={"step": 5}, expected_bytes=1)
    assert "train.keep_last" in capsys.readouterr().out
    assert not list((tmp_path / "ckpt").glob("step_*"))
