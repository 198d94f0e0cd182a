"""Outputs appear whole or not at all; one writer per output; disk errors are one line."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from cmoe_carve.atomic import atomic_directory, lock_path, output_lock, write_text_file
from cmoe_carve.errors import CheckpointError


def test_a_failed_block_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="no space left on the device"):
        with atomic_directory(out, overwrite=False) as tmp:
            (tmp / "part").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert list(tmp_path.iterdir()) == []


def test_output_has_the_permissions_of_a_plain_directory(tmp_path):
    with atomic_directory(tmp_path / "out", overwrite=False) as tmp:
        (tmp / "f").write_text("x")
    (tmp_path / "plain").mkdir()
    mode = stat.S_IMODE
    assert mode((tmp_path / "out").stat().st_mode) == mode((tmp_path / "plain").stat().st_mode)


def test_second_writer_fails_at_once_and_the_lock_goes_with_the_first(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(CheckpointError, match="another cmoe process is writing"):
            with output_lock(out):
                pass
        # Another process too (flock is per open file, so this also holds across processes).
        code = ("import sys; from cmoe_carve.atomic import output_lock\n"
                "from cmoe_carve.errors import CheckpointError\n"
                f"try:\n  with output_lock({str(out)!r}): sys.exit(0)\n"
                "except CheckpointError: sys.exit(3)")
        assert subprocess.run([sys.executable, "-c", code]).returncode == 3
    assert not lock_path(out).exists()
    with output_lock(out):  # free again
        pass


def test_lock_removes_partials_of_killed_runs(tmp_path):
    out = tmp_path / "out"
    stale = tmp_path / ".out.partial-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".other.partial-abc"  # another output's: not ours to remove
    other.mkdir()
    with output_lock(out):
        pass
    assert not stale.exists() and other.exists()


def test_results_file_is_written_whole(tmp_path):
    path = tmp_path / "r.json"
    write_text_file(path, "{}\n", "--json")
    assert path.read_text() == "{}\n" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    with pytest.raises(CheckpointError, match="is a directory"):
        write_text_file(tmp_path, "{}", "--json")


def test_only_rank_zero_of_a_distributed_run_takes_the_lock(tmp_path, monkeypatch):
    from cmoe_carve.atomic import holds_output_lock

    @holds_output_lock
    def write(out):
        return lock_path(out).exists()

    out = tmp_path / "out"
    assert write(out) is True  # a single process, or rank 0, holds it
    monkeypatch.setenv("RANK", "1")
    with output_lock(out):  # rank 0 holds it while rank 1 runs
        assert write(out) is True  # rank 1 goes on (the file seen is rank 0's)
