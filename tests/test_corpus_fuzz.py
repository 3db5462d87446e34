"""The corpus readers under generated bad input: random bytes, truncations, wrong JSON shapes, broken
CSV, huge lines. `scalegen data build` on each must either succeed or exit 2 with a one-line
`DataError` (never another exception, never a traceback) and leave no output behind when it fails."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

VALID = {"train": ["a red car", "a blue tulip", "a wooden chair, side view"], "val": ["a small duck"]}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=25)


def _valid_bytes(fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(VALID).encode()
    if fmt == "jsonl":
        return "".join(json.dumps({"prompt": p}) + "\n" for p in VALID["train"]).encode()
    if fmt == "csv":
        return ("id,prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(VALID["train"]))).encode()
    return "\n".join(VALID["train"]).encode()


def _shaped(fmt: str):
    """Well-formed syntax, arbitrary content: the wrong-shape cases of each format."""
    if fmt == "json":
        return json_values.map(lambda v: json.dumps(v).encode())
    if fmt == "jsonl":
        return st.lists(json_values.map(json.dumps) | st.text(max_size=40), max_size=8).map(
            lambda lines: "\n".join(lines).encode())
    if fmt == "csv":
        cell = st.sampled_from(["prompt", "id", ""]) | st.text(alphabet=st.sampled_from(list('ab ,"\n\r\x00;')),
                                                                 max_size=12)
        return st.lists(st.lists(cell, max_size=4).map(",".join), max_size=6).map(lambda rows: "\n".join(rows).encode())
    return st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass"))


def _bad_corpora(fmt: str):
    valid = _valid_bytes(fmt)
    return st.one_of(
        st.binary(max_size=400),  # random bytes (mostly not UTF-8)
        st.integers(0, len(valid)).map(lambda n: valid[:n]),  # truncated files
        st.tuples(st.integers(0, len(valid)), st.binary(min_size=1, max_size=4)).map(  # a corrupted byte run
            lambda a: valid[:a[0]] + a[1] + valid[a[0] + len(a[1]):]),
        _shaped(fmt),
        st.integers(10_000, 300_000).map(lambda n: (b"x" * n) if fmt != "json" else b'["' + b"x" * n + b'"]'),
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "jsonl", "csv", "txt"])
def test_data_build_never_crashes_or_leaves_files_on_bad_corpora(fmt, capsys):
    from scalegen.cli import main

    seen = {"runs": 0, "refused": 0}

    @settings(max_examples=1000, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(_bad_corpora(fmt))
    def check(data: bytes):
        work = Path(tempfile.mkdtemp(prefix="fuzz-"))
        try:
            corpus, out = work / f"corpus.{fmt}", work / "shards"
            corpus.write_bytes(data)
            rc = main(["data", "build", "--corpus", str(corpus), "--out", str(out), "--shard-size", "2"])
            err = capsys.readouterr().err
            assert rc in (0, 2), rc
            seen["runs"] += 1
            if rc == 2:
                seen["refused"] += 1
                lines = err.strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
                assert not out.exists(), f"a refused build left {sorted(p.name for p in out.rglob('*'))}"
        finally:
            shutil.rmtree(work, ignore_errors=True)

    check()
    assert seen["runs"] >= 1000 and seen["refused"] > 0


def test_each_reader_names_the_line_of_undecodable_bytes(tmp_path):
    """The four formats report bytes that are not UTF-8 with the file and line, as .txt always did."""
    from scalegen.data.prompts import read_corpus_lines
    from scalegen.errors import DataError

    for fmt, good in (("json", b'{"train": ["a car",\n'), ("jsonl", b'"a car"\n'), ("csv", b"prompt\n"),
                      ("txt", b"a car\n")):
        p = tmp_path / f"c.{fmt}"
        p.write_bytes(good + b"\xff\xfe broken\n")
        with pytest.raises(DataError, match=rf"c\.{fmt}:2: not UTF-8 text"):
            read_corpus_lines(p)
