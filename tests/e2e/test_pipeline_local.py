"""A pipeline with cluster=local runs its stages here, one after the other, each reading the export of
the one before (before, pipeline=... with cluster=local trained only the first stage and exited 0).
One rank and two steps per stage keep it short (about a minute of CPU)."""
import pytest

from e2e_helpers import launch, train_records

pytestmark = pytest.mark.e2e


def test_a_local_pipeline_runs_every_stage_in_order(tmp_path):
    proc = launch(tmp_path, "pipeline=dpo", "train.max_steps=2", "hw.gpus_per_node=1")
    assert "pipeline stage 1/2 sft" in proc.stdout and "pipeline stage 2/2 dpo" in proc.stdout
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    assert (sft / "final" / "config.json").is_file()
    assert [r["step"] for r in train_records(sft)] == [1, 2] and [r["step"] for r in train_records(dpo)] == [1, 2]
    assert (dpo / "final" / "config.json").is_file()
    # DPO started from SFT's export, after SFT had finished.
    assert f"path: {sft}/final" in (dpo / "config.yaml").read_text()
    assert (sft / "final").stat().st_mtime <= (dpo / "metrics.jsonl").stat().st_mtime
