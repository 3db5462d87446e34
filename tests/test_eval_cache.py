"""`scalegen eval` keeps the ground truth between calls: same numbers, no second render, a changed
world/camera/renderer config or a damaged file renders it anew."""
import json

import pytest
import torch

from conftest import TINY
from scalegen.cli import main
from scalegen.config import load_config
from scalegen.eval.oracle import cached_gallery, eval_cameras, evaluate_oracle, ground_truth_gallery
from scalegen.priors import build_ground_truth, build_world
from scalegen.priors.oracle_world import OracleWorld
from scalegen.train.loop import train
from scalegen.train.model import load_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("evalcache") / "run"
    torch.manual_seed(0)
    train(load_config(None, [*TINY, "train.max_steps=2"]), run)
    return run


@pytest.fixture
def gt_renders(monkeypatch):
    """Counts the ground-truth scenes rendered (every ground-truth render asks the world for their field)."""
    calls = []
    for name in ("field", "component_field"):
        real = getattr(OracleWorld, name)

        def counted(self, ids, _real=real):
            calls.append(len(ids))
            return _real(self, ids)

        monkeypatch.setattr(OracleWorld, name, counted)
    return calls


def _metrics(path):
    res = json.loads(path.read_text())
    return {k: v for k, v in res.items() if k not in ("eval_s", "checkpoint")}


def test_second_eval_reuses_the_ground_truth_and_gives_the_same_numbers(tiny_run, tmp_path, gt_renders, capsys):
    assert main(["eval", "--ckpt", str(tiny_run), "--json", str(tmp_path / "a.json")]) == 0
    first = len(gt_renders)
    assert first > 0 and list((tiny_run / "eval-cache").glob("gt-gallery-*.safetensors"))
    assert main(["eval", "--ckpt", str(tiny_run), "--json", str(tmp_path / "b.json")]) == 0
    assert len(gt_renders) == first  # nothing rendered the second time
    assert _metrics(tmp_path / "a.json") == _metrics(tmp_path / "b.json")
    # ... and they are the numbers of the uncached evaluation (ground truth rendered per batch)
    cfg, te, model, _ = load_run(tiny_run)
    plain = evaluate_oracle(cfg, model, te, build_world(cfg))
    assert {k: v for k, v in _metrics(tmp_path / "a.json").items() if k in plain} == json.loads(json.dumps(plain))


def test_gallery_cache_is_keyed_by_config_and_verified(tmp_path, gt_renders, capsys):
    cfg = load_config(None, TINY)
    world = build_world(cfg)
    gt = build_ground_truth(cfg, world)
    cams = eval_cameras(cfg)
    rgb, op = cached_gallery(gt, cams, tmp_path)
    ref_rgb, ref_op = ground_truth_gallery(gt, cams)
    assert torch.equal(rgb, ref_rgb) and torch.equal(op, ref_op)
    n = len(gt_renders)
    again = cached_gallery(gt, cams, tmp_path)
    assert len(gt_renders) == n and torch.equal(again[0], rgb)
    # another camera config (eval resolution), another world or another renderer: a new file, rendered
    for over in (["camera.eval_resolution=20"], ["world.colors=[red, green]"], ["prior.oracle.samples=20"]):
        c2 = load_config(None, [*TINY, *over])
        w2 = build_world(c2)
        cached_gallery(build_ground_truth(c2, w2), eval_cameras(c2), tmp_path)
        assert len(gt_renders) > n, over
        n = len(gt_renders)
    assert len(list(tmp_path.glob("gt-gallery-*.safetensors"))) == 4
    # a damaged file is not trusted: rendered again (with a note) and replaced
    path = next(p for p in tmp_path.glob("gt-gallery-*.safetensors")
                if p.name[len("gt-gallery-"):].startswith(_key(gt, cams)))
    data = bytearray(path.read_bytes())
    data[-8:] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
    path.write_bytes(bytes(data))
    fixed = cached_gallery(gt, cams, tmp_path)
    assert len(gt_renders) > n and "rendering it again" in capsys.readouterr().out
    assert torch.equal(fixed[0], rgb)
    n = len(gt_renders)
    cached_gallery(gt, cams, tmp_path)
    assert len(gt_renders) == n


def _key(gt, cams):
    from scalegen.eval.oracle import gallery_key

    return gallery_key(gt, cams)[:24]
