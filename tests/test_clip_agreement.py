"""`scalegen bench clip-agreement`: Spearman's rho over runs, and the bench end to end on tiny runs."""
from __future__ import annotations

import pytest

from scalegen.bench.clip_agreement import ClipAgreementOptions, bench_clip_agreement, ranks, spearman
from scalegen.errors import ScalegenError

from conftest import TINY


def test_ranks_share_ties_and_rho_is_pearson_of_ranks():
    assert ranks([3.0, 1.0, 2.0, 2.0]) == [4.0, 1.0, 2.5, 2.5]
    assert spearman([1, 2, 3, 4], [10, 20, 25, 100]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [5, 5, 5]) != spearman([1, 2, 3], [5, 5, 5])  # NaN: a constant side has no order
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.3, 1.2, 1.2, 0.7, 2.5, -1.0], [2.0, 0.1, 0.5, 0.5, 3.0, 1.0]
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)


def test_scores_each_run_both_ways_and_ranks_them(tmp_path):
    from scalegen.config import load_config
    from scalegen.eval.clip_models import make_tiny_clip_model
    from scalegen.eval.oracle import evaluate_oracle
    from scalegen.priors import build_world
    from scalegen.train.loop import train
    from scalegen.train.model import load_run

    run = tmp_path / "run"
    train(load_config(None, TINY + ["train.max_steps=3", "train.ckpt_every=1", "train.keep_ckpts=3"]), run)
    ckpts = [str(run / "checkpoints" / f"step_{s:07d}") for s in (1, 2, 3)]
    clip = make_tiny_clip_model(tmp_path / "clip", backend="transformers")
    opts = ClipAgreementOptions(model=str(clip), runs=ckpts, resolution=16)
    res = bench_clip_agreement(opts, [], str(tmp_path / "bench"))
    assert res["n_runs"] == 3 and [r["checkpoint"] for r in res["runs"]] == ckpts
    cfg, te, model, _ = load_run(ckpts[1])
    truth = evaluate_oracle(cfg, model, te, build_world(cfg))
    assert res["runs"][1]["seen"]["psnr"] == pytest.approx(truth["seen"]["psnr"], abs=1e-9)  # scalegen eval's number
    for split in ("seen", "unseen"):
        rho = res["spearman"][split]["clip_similarity_vs_psnr"]
        want = spearman([r[split]["clip_similarity"] for r in res["runs"]], [r[split]["psnr"] for r in res["runs"]])
        assert rho == pytest.approx(want, abs=1e-4)
    again = bench_clip_agreement(opts, [], str(tmp_path / "bench"))  # kept CLIP rows are read, not rescored
    assert again["spearman"] == res["spearman"] and again["runs"][0]["seen"] == res["runs"][0]["seen"]

    with pytest.raises(ScalegenError, match="at least 3 runs"):
        bench_clip_agreement(ClipAgreementOptions(model=str(clip), runs=ckpts[:2]), [], str(tmp_path / "b2"))
    with pytest.raises(ScalegenError, match="bench.model=DIR"):
        bench_clip_agreement(ClipAgreementOptions(runs=ckpts), [], str(tmp_path / "b2"))
    with pytest.raises(ScalegenError, match="no config overrides"):
        bench_clip_agreement(opts, ["camera.resolution=8"], str(tmp_path / "b2"))
