"""The one atomic-write module: a failed write leaves the old file (or nothing), never half a file."""
import pytest

from scalegen import atomic


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    p = atomic.write_text(tmp_path / "a.json", "old")
    with pytest.raises(RuntimeError), atomic.writing(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_write_json_replaces_the_file_whole(tmp_path):
    p = atomic.write_json(tmp_path / "r.json", {"x": 1})
    atomic.write_json(p, {"x": 2})
    assert p.read_text() == '{\n  "x": 2\n}\n'


def test_a_staged_folder_appears_only_when_the_build_succeeds(tmp_path):
    dest = tmp_path / "shards"
    with pytest.raises(ValueError), atomic.staged_folder(dest) as stage:
        (stage / "part-0.tar").write_bytes(b"x")
        raise ValueError("bad corpus line")
    assert list(tmp_path.iterdir()) == []
    with atomic.staged_folder(dest) as stage:
        (stage / "part-0.tar").write_bytes(b"x")
    assert [x.name for x in dest.iterdir()] == ["part-0.tar"]
    assert [x.name for x in tmp_path.iterdir()] == ["shards"]
