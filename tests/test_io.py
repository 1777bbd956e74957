"""Output helpers and the workflow-step wrapper: what reaches the console and the log."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from shardtune.io import atomic_dir, read_json, write_json

REPO = Path(__file__).resolve().parents[1]


def run_step(tmp_path, body):
    """Run `body` in a fresh Python on this checkout (io.job swaps sys.stdout and sys.stderr)."""
    script = "from shardtune.io import job\n" + textwrap.dedent(body)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)


def test_a_step_can_say_a_line_on_the_console_as_well_as_the_log(tmp_path):
    result = run_step(
        tmp_path,
        """
        with job("step.log", name="prepare_data") as log:
            log("only in the log")
            print("also only in the log")
            log.console("dropped 3 rows: train 3 (3 unknown role); see stats.json")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "prepare_data: dropped 3 rows: train 3 (3 unknown role); see stats.json\n"
    assert (tmp_path / "step.log").read_text() == (
        "only in the log\nalso only in the log\ndropped 3 rows: train 3 (3 unknown role); see stats.json\n"
    )


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_temporaries_of_killed_steps_are_removed_by_the_next_write(tmp_path):
    # A step killed (SIGKILL) inside atomic_dir leaves its temporary directory behind.
    killed = run_step(
        tmp_path,
        """
        import os, signal
        from shardtune.io import atomic_dir
        with atomic_dir("out") as tmp:
            (tmp / "data.bin").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
        """,
    )
    assert killed.returncode == -9
    [left] = tmp_path.glob(".out.tmp-*")
    host = socket.gethostname()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.tmp-{host}-{sleeper.pid}"  # a step still writing: kept
        other_host = tmp_path / f".out.tmp-{host}x-{dead_pid()}"  # maybe alive there: kept
        legacy = tmp_path / f".out.tmp-{dead_pid()}"  # the name before hosts were named
        for made in (live, other_host, legacy):
            made.mkdir()
            (made / "part").write_text("x")
        stale_json = tmp_path / f".out.json.tmp-{host}-{dead_pid()}"  # out.json's: removed by write_json
        stale_json.write_text("{")
        other_output = tmp_path / f".other.tmp-{host}-{dead_pid()}"  # another output's: not touched
        other_output.mkdir()
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "data.bin").write_text("done")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [live.name, other_host.name, stale_json.name, other_output.name, "out"]
        )
        assert not left.exists() and not legacy.exists() and live.is_dir()
        write_json(tmp_path / "out.json", {"a": 1})
        assert not list(tmp_path.glob(".out.json.tmp-*")) and read_json(tmp_path / "out.json") == {"a": 1}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_write_json_removes_its_temporary_when_it_fails(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_json(tmp_path / "out.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


def test_atomic_file_replaces_only_on_success_and_leaves_no_temporary(tmp_path):
    from shardtune.io import atomic_file, write_text

    out = tmp_path / "table.tsv"
    write_text(out, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert out.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["table.tsv"]
