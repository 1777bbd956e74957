"""Output helpers and the workflow-step wrapper: what reaches the console and the log."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_step(tmp_path, body):
    """Run `body` inside io.job in a fresh Python (job swaps sys.stdout and sys.stderr)."""
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
