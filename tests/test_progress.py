"""Progress bars and logs (issue #14): what a person at a terminal sees on stderr.

tqdm shows bars only when stderr is a terminal, so these tests run the real command line
with stderr on a pseudo-terminal and read what it printed.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_on_tty(*args, timeout: float = 120) -> tuple[int, str]:
    """Run ``wsi-pipeline ARGS`` with stderr on a pseudo-terminal; returns the exit code and what stderr got."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=slave, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the command ended and closed its side
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


def _segments(text: str) -> list[str]:
    """What the terminal drew piece by piece: bars redraw with carriage returns, log lines end with newlines."""
    return [s for s in re.split(r"[\r\n]", re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)) if s.strip()]


@pytest.mark.parametrize("difficulty", ["easy", "realistic"])
def test_synth_shows_the_slides_written_and_quiet_hides_them(tmp_path, difficulty):
    rc, err = run_on_tty("synth", tmp_path / "c", "--positives", "1", "--negatives", "1", "--size-px", "1024",
                         "--annotated", "0", "--difficulty", difficulty)
    assert rc == 0, err
    bars = [s for s in _segments(err) if re.match(r"synth: +\d+%\|", s)]
    assert bars and "2/2" in bars[-1] and "slide" in bars[-1], err
    assert any("INFO generating 2 slides" in s for s in _segments(err)), err  # log line intact above the bar
    if difficulty != "easy":
        return
    rc, err = run_on_tty("synth", tmp_path / "q", "--positives", "1", "--negatives", "0", "--size-px", "1024",
                         "--annotated", "0", "--quiet")
    assert rc == 0 and "%|" not in err and "synth:" not in err, err


def test_tile_shows_the_tiles_of_the_slide_being_tiled(tmp_path, synth_slides):
    rc, err = run_on_tty("tile", synth_slides["tissue"], "--out", tmp_path / "stores", "--config", "tiny",
                         "--workers", "0")
    assert rc == 0, err
    seg = _segments(err)
    tiles = [s for s in seg if re.match(r"tissue: +\d+%\|.*\| \d+/\d+ \[.*tile/s", s)]
    assert tiles, err  # the bar over the slide's tiles, under the bar over the slides
    n = int(re.search(r"\| \d+/(\d+) \[", tiles[0]).group(1))
    assert n > 1 and all(re.search(rf"\| \d+/{n} \[", s) for s in tiles)
    assert any(re.match(r"tile: +100%\|.*\| 1/1 \[", s) for s in seg), err  # the slide bar stays
    assert any(re.search(rf"INFO done tissue: {n} tiles in", s) for s in seg), err  # log lines are not cut by bars
    rc, err = run_on_tty("tile", synth_slides["tissue"], "--out", tmp_path / "stores2", "--config", "tiny",
                         "--workers", "0", "--quiet")
    assert rc == 0 and "%|" not in err, err


def test_every_command_takes_log_file_and_logs_through_tqdm():
    """--log-file, --quiet and --verbose on every command, and each sets up logging with them
    (setup_logging: console lines through tqdm.write, so they pass above the bars)."""
    import inspect

    for name, cmd in main.commands.items():
        opts = {o for p in cmd.params for o in p.opts}
        assert {"--log-file", "--quiet", "--verbose"} <= opts, name
        assert "setup_logging(quiet, verbose, log_file)" in inspect.getsource(cmd.callback), name
