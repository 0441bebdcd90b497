"""wsi.atomic: the one atomic, durable, umask-honouring way files are put in place."""

from __future__ import annotations

import json
import os
import stat

import pytest

from wsi.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text


@pytest.fixture
def umask():
    old = os.umask(0o002)
    try:
        yield 0o002
    finally:
        os.umask(old)


def _mode(p) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_written_files_follow_the_umask(tmp_path, umask):
    atomic_write_text(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "sub" / "b.json", {"x": 1})
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01")
    with atomic_path(tmp_path / "d.dat") as tmp:
        tmp.write_bytes(b"by a writer that wants a name")
    for name in ("a.txt", "sub/b.json", "c.bin", "d.dat"):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert json.loads((tmp_path / "sub" / "b.json").read_text()) == {"x": 1}


def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise Boom()
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # fails after the temporary file exists
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_temporary_names_are_hidden_and_keep_the_suffix(tmp_path):
    seen = []
    with atomic_path(tmp_path / "pic.png") as tmp:
        seen.append(tmp.name)
        tmp.write_bytes(b"x")
    assert seen[0].startswith(".tmp-") and seen[0].endswith("-pic.png")
