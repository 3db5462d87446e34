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


def test_overwrite_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    dest = tmp_path / "site"
    with atomic.staged_folder(dest) as stage:
        (stage / "index.html").write_text("old")
    with pytest.raises(OSError), atomic.staged_folder(dest, overwrite=True) as stage:
        (stage / "index.html").write_text("half")
        raise OSError("disk full")
    assert (dest / "index.html").read_text() == "old"
    with atomic.staged_folder(dest, overwrite=True) as stage:
        (stage / "index.html").write_text("new")
    assert (dest / "index.html").read_text() == "new" and [x.name for x in tmp_path.iterdir()] == ["site"]


def test_the_temporary_keeps_the_suffix_writers_choose_a_format_by(tmp_path):
    with atomic.writing(tmp_path / "spin.mp4") as tmp:
        assert tmp.suffix == ".mp4" and tmp.name.startswith(".") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "spin.mp4").read_bytes() == b"x"
