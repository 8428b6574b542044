"""write_atomic: a reader sees the old file or the new one, never a half-written one, and no temporary is left."""

from __future__ import annotations

import pytest

from wattscope.files import write_atomic


def test_writes_text_and_bytes_and_replaces(tmp_path):
    p = tmp_path / "r.json"
    assert write_atomic(p, "é1") == p and p.read_text(encoding="utf-8") == "é1"
    write_atomic(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "r.json"
    p.write_text("old")

    class Unencodable(str):
        def encode(self, *args, **kwargs):  # fails mid-write, after the temporary exists
            raise UnicodeError("boom")

    with pytest.raises(UnicodeError):
        write_atomic(p, Unencodable("new"))
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["r.json"]


def test_a_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "no" / "r.json", "x")
