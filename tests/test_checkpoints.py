"""Telling complete checkpoints from ones cut off while being written."""

from shardtune.train.checkpoints import MARKER, checkpoints, latest_complete, remove_incomplete


def make(train_dir, step, complete):
    path = train_dir / f"checkpoint-{step}"
    (path / "pytorch_model_fsdp_0").mkdir(parents=True)
    if complete:
        (path / MARKER).write_text(f"{step}\n")
    return path


def test_latest_complete_skips_partial_checkpoints_and_sorts_by_step(tmp_path):
    make(tmp_path, 5, True)
    make(tmp_path, 10, True)
    make(tmp_path, 15, False)
    (tmp_path / "checkpoint-x").mkdir()
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-10", "checkpoint-15"]
    assert latest_complete(tmp_path).name == "checkpoint-10"


def test_remove_incomplete_keeps_only_complete_checkpoints(tmp_path):
    make(tmp_path, 5, True)
    make(tmp_path, 10, False)
    removed = []
    remove_incomplete(tmp_path, log=removed.append)
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint-5"]
    assert len(removed) == 1 and "checkpoint-10" in removed[0]


def test_no_checkpoint_means_a_fresh_start(tmp_path):
    assert latest_complete(tmp_path) is None
