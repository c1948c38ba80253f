"""Long work shows where it stands: a bar on a terminal, log lines otherwise (pipelines.progress)."""
from __future__ import annotations

import io
import subprocess
import sys

from pipelines import progress
from tests import series_factory as make
from tests.paths import REPO


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_not_on_a_terminal_a_line_every_period_and_one_at_the_end():
    now = [0.0]
    log = io.StringIO()
    shown = progress.Progress("series 1.2.3", 10, unit="images", every_s=30, stream=log, clock=lambda: now[0])
    for seconds, done in ((1, 2), (2, 4), (31, 5), (32, 10)):  # a line at 31 s (30 s on) and when done
        now[0] = seconds
        shown.update(done)
    shown.close()  # nothing more: the last state was printed
    assert log.getvalue().splitlines() == ["series 1.2.3: 5/10 images  31s, eta 31s",
                                           "series 1.2.3: 10/10 images  32s"]


def test_on_a_terminal_a_bar():
    screen = Terminal()
    shown = progress.Progress("train sr3d", 4, unit="steps", stream=screen)
    for step in range(1, 5):
        shown.update(step, note=f"loss {1 / step:.3f}")
    shown.close()
    assert "train sr3d: 100%" in screen.getvalue() and "4/4" in screen.getvalue() and "loss 0.250" in screen.getvalue()


def test_srnode_process_logs_lines_when_stderr_is_not_a_terminal(tmp_path):
    make.ct_small(tmp_path / "in", "process-progress")
    ran = subprocess.run([sys.executable, "-m", "node.cli", "process", str(tmp_path / "in"), "--pipeline", "interp",
                          "--set", "scale=2", "--out", str(tmp_path / "out")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    [line] = [line for line in ran.stderr.splitlines() if line.startswith("series ")]
    assert line.endswith("images  0s") and ": 1/1 images" in line and "\r" not in ran.stderr
