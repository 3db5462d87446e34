"""Benchmarks run end to end on a tiny budget and report what their JSON promises."""
import json

import pytest

from conftest import TINY, run_cli

from scalegen.config import load_config
from scalegen.errors import ScalegenError


@pytest.mark.slow
def test_saturation_bench_json(tmp_path):
    out = tmp_path / "sat.json"
    r = run_cli("bench", "saturation", "--out", tmp_path, "--json", out, *TINY, "train.max_steps=3")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    meta = data.pop("meta")  # what produced the file: the command as typed, the date, the commit
    assert meta["argv"][:2] == ["bench", "saturation"] and meta["command"].startswith("scalegen bench saturation")
    assert set(data) == {"sds_cfg100", "asd_cfg7.5"}
    for v in data.values():
        assert {"color_error", "psnr"} <= set(v) and v["steps"] == 3


def test_unknown_bench_is_a_clear_error():
    r = run_cli("bench", "nope")
    assert r.returncode == 2 and "choose from" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name, item, message", [
    ("toy2d", "bench.step=3", "did you mean 'bench.steps'"),
    ("sharpness", "bench.value=[0.1]", "did you mean 'bench.values'"),
    ("distill", "bench.part=gpu", "must be one of 'all', 'oracle', 'sd'"),
    ("data", "bench.sizes=ten", "must be a list"),
    ("generators", "bench.generators=[conv4d]", "must be one of"),
    ("toy2d", "train.max_steps=3", "runs no training config"),
    ("eval", "bench.image=4", "did you mean 'bench.images'"),
    ("eval", "bench.resolutions=[4]", "must be >= 8"),
    ("refine", "bench.distiller=[vdm]", "did you mean 'bench.distillers'"),
    ("refine", "bench.representation=nerf", "must be one of"),
])
def test_bench_options_are_typed_config_keys(name, item, message):
    """Bench options go through the config schema's checks: typos name the closest option, wrong
    types and values are one-line errors before anything runs."""
    from scalegen.bench import run_bench
    from scalegen.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        run_bench(name, [item], out_root="/nonexistent")


@pytest.mark.slow
def test_guidance_bench_shows_cfg_vanishing_at_low_t():
    """The mechanism behind the saturation results: once the unconditional mixture recognises a
    prompt's class (low t), eps_c - eps_u vanishes and CFG 100 no longer pushes colours; at high t
    it does. Both distillers pull a colour error back toward the ground truth."""
    from scalegen.bench.guidance import GuidanceOptions, bench_guidance

    tiny = [o for o in TINY if not o.startswith(("data.prompts_per_step", "prior.oracle.n_uncond"))]
    res = bench_guidance(GuidanceOptions(), [*tiny, "data.prompts_per_step=4", "prior.oracle.n_uncond=6"])
    rows = {r["t"]: r for r in res["rows"]}
    lo, hi = rows[20], rows[980]
    assert lo["r_own"] > 0.99 and hi["r_own"] < 0.9
    assert abs(lo["sat_sds100"]) < 1e-3 < hi["sat_sds100"]
    assert all(r["pull_sds"] > 0 and r["pull_asd"] > 0 for r in res["rows"])


def test_toy2d_bench_writes_pngs_and_counts_components(tmp_path):
    import torch

    from scalegen.bench.toy2d import Toy2DOptions, bench_toy2d, coverage, make_prior

    prior = make_prior(6, 1.0, 0.05)
    x = prior.mu_c[[0, 0, 2, 4]].clone()
    cov = coverage(x, prior.mu_c, 0.05)
    assert cov["components_hit"] == 3 and cov["on_mode_frac"] == 1.0 and cov["within_std_over_sigma"] == 0.0
    res = bench_toy2d(Toy2DOptions(steps=8, particles=16, out_dir=str(tmp_path)), [])
    assert set(res["methods"]) == {"sds", "csd", "vsd", "asd", "vdm", "vdm_pure"}
    for name in res["methods"]:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
    assert (tmp_path / "grad_norm.png").exists() and (tmp_path / "particles.png").exists()
    assert torch.isfinite(torch.tensor([r["final_grad_norm"] for r in res["methods"].values()])).all()


@pytest.mark.slow
def test_distill_bench_oracle_json(tmp_path):
    out = tmp_path / "d.json"
    r = run_cli("bench", "distill", "--out", tmp_path, "--json", out, *TINY, "train.max_steps=2", "bench.part=oracle")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())["oracle"]
    assert set(data) == {"sds", "csd", "vsd", "asd", "vdm"}
    for v in data.values():
        assert {"psnr_seen", "psnr_unseen", "color_error", "step_s"} <= set(v) and v["prior_calls"] == 1
@pytest.mark.slow
def test_data_bench_json(tmp_path):
    """`bench data` on a tiny budget: JSON keys per size, loader figures measured in a subprocess."""
    out = tmp_path / "data.json"
    r = run_cli("bench", "data", "--out", tmp_path, "--json", out, "bench.sizes=[200,400]", "bench.clip_sizes=[]",
                "bench.sd_sizes=[64]", "bench.stream=2000", "bench.sd_stream=64", env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    for n in ("200", "400"):
        assert data[n]["prompts_per_s"] > 0 and 100 < data[n]["peak_rss_mb"] < 2000
    assert data["sd21_shapes"][0]["bytes_per_prompt"] > 2 * (1024 + 77 * 1024)
    assert not (tmp_path / "data" / "bow-200").exists()  # shards deleted after measuring


def test_claims_verdict_rules():
    """The rules the claims bench states before measuring: an effect holds only with the paper's sign on
    every seed and beyond both the seeds' spread and the minimum effect; the clear opposite does not hold."""
    from scalegen.bench.claims import level, paired

    assert paired([20.0, 21.0], [18.0, 19.2], +1, 0.5)[0] == "holds"  # d = 2.0, 1.8: spread 0.2
    assert paired([20.0, 21.0], [18.0, 21.2], +1, 0.5)[0] == "inconclusive"  # signs disagree
    assert paired([20.0, 21.0], [19.8, 20.7], +1, 0.5)[0] == "inconclusive"  # below the minimum effect
    assert paired([20.0, 25.0], [19.0, 20.0], +1, 0.5)[0] == "inconclusive"  # d = 1, 5: spread 4 > mean 3
    assert paired([18.0, 19.0], [20.0, 21.1], +1, 0.5)[0] == "does_not_hold"
    assert paired([0.3, 0.2], [0.0, 0.05], -1, 0.1)[0] == "does_not_hold"  # sign -1: B should be larger
    v, d = paired([0.5, 0.6], [0.1, 0.1], +1, 0.1)
    assert v == "holds" and d["diff_per_seed"] == [0.4, 0.5] and d["spread"] == 0.1
    assert level([0.3, 0.2], 0.1) == "holds" and level([0.05, 0.2], 0.1) == "inconclusive"
    assert level([0.0, 0.1], 0.1) == "does_not_hold" and level([0.01, 0.0], 0.05, above=False) == "holds"


def test_claims_multi_face_remedy_needs_the_object_kept():
    """A remedy that removes the marker from the back by losing the object (PSNR more than 0.5 dB below
    the view-agnostic arm on every seed) does not hold, however low its multi-face rate."""
    from scalegen.bench.claims import remedy_verdict

    base_rate, base_psnr = [0.2, 0.35], [16.9, 16.1]
    assert remedy_verdict(base_rate, [0.0, 0.1], base_psnr, [19.1, 19.0])[0] == "holds"
    v, d = remedy_verdict(base_rate, [0.0, 0.0], base_psnr, [13.1, 12.9])  # rate 0, object lost
    assert v == "does_not_hold" and d["object_kept"] == "does_not_hold" and d["psnr_below"] == [3.8, 3.2]
    assert remedy_verdict(base_rate, [0.0, 0.0], base_psnr, [16.6, 15.0])[0] == "inconclusive"  # kept on one seed
    assert remedy_verdict(base_rate, [0.4, 0.5], base_psnr, [17.0, 16.5])[0] == "does_not_hold"  # more faces


@pytest.mark.slow
def test_claims_bench_json(tmp_path):
    """`bench claims` end to end on a tiny budget: the JSON rows carry claim, source, numbers and a verdict
    of the three words; a second call reuses the finished runs and merges its rows into the same file."""
    merged = tmp_path / "claims.json"
    cmd = ["bench", "claims", "--out", tmp_path, "bench.steps=2", "bench.eval_prompts=2",
           f"bench.pictures={tmp_path / 'pics'}", f"bench.merge={merged}"]
    r = run_cli(*cmd, "bench.claims=[f]")
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_cli(*cmd, "bench.claims=[f,a]")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("reusing") == 8  # claim f's 4 arms x 2 seeds
    rows = json.loads(merged.read_text())["claims"]
    assert [x["id"] for x in rows] == ["a", "f1", "f2", "f3", "f4"]
    for x in rows:
        assert {"claim", "source", "numbers", "verdict", "rule", "command"} <= set(x)
        assert x["verdict"] in ("holds", "does_not_hold", "inconclusive")
    assert (tmp_path / "pics" / "f1.png").stat().st_size > 0


@pytest.mark.slow
def test_two_claims_calls_on_one_out_train_each_run_once(tmp_path):
    """Two `bench claims` processes started together on one --out split the runs (each trained by one of
    them, the other reuses it) and give the same row."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "scalegen.cli", "bench", "claims", "--out", str(tmp_path), "bench.claims=[c]",
           "bench.sizes=[15]", "bench.steps=2", "bench.eval_prompts=2", "bench.pictures=null"]
    procs = [subprocess.Popen([*cmd, "--json", str(tmp_path / f"{i}.json")], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    trained = [line for out, _ in outs for line in out.splitlines() if line.startswith("[claims] training")]
    assert len(trained) == len(set(trained)) == 4  # eta 0.1 and eta 0, 2 seeds: each trained once in all
    rows = [json.loads((tmp_path / f"{i}.json").read_text())["claims"][0] for i in range(2)]
    assert rows[0]["numbers"] == rows[1]["numbers"]


def test_claims_row_command_carries_the_options_that_shape_the_runs():
    from scalegen.bench.claims import ClaimsOptions, option_items

    assert option_items(ClaimsOptions()) == []
    assert option_items(ClaimsOptions(steps=150, sizes=[15, 400], scale_distillers=["sds", "asd"], merge="x.json")) == \
        ["bench.sizes=[15,400]", "bench.scale_distillers=[sds,asd]"]


def test_claims_choose_each_distillers_rate_on_the_smallest_corpus_and_keep_the_shared_verdict(tmp_path, monkeypatch):
    """With bench.lr_scales, each distiller's rate is the one with the best mean seen PSNR on the smallest
    corpus, used unchanged at every size; claim b's verdict is taken at the chosen rates and the one at the
    shared rates (1.0) is kept beside it. Runs are faked: ASD falls with corpus size at the shared rate and
    improves at 3x, SDS is flat at every rate and best at 1x."""
    import re

    from scalegen.bench.claims import ClaimsOptions, Runner, bench_claims, claim_b

    best = {"sds": 1.0, "asd": 3.0}
    trained = []

    def fake_run(self, world, name, arm, seed, splits=None, wait=True):
        d, n, scale = re.fullmatch(r"([a-z]+)_n(\d+)(?:_lr([\d.]+))?", name).groups()
        n, scale = int(n), float(scale or 1.0)
        trained.append((d, n, scale, seed))
        seen = 25.0 - abs(scale - best[d]) + 0.1 * seed
        slope = {"sds": 0.0, "asd": -2.0 if scale == 1.0 else 1.0}[d] * (n > 15)
        levels = {f"unseen_{k}": {"psnr": 20.0 + slope + 0.05 * seed} for k in ("a", "b", "c")}
        return {"metrics": {"seen": {"psnr": seen}, **levels}, "run_dir": ""}

    monkeypatch.setattr(Runner, "run", fake_run)
    opts = ClaimsOptions(seeds=2, steps=3, sizes=[15, 40], scale_distillers=["sds", "asd"], lr_scales=[0.3, 1.0, 3.0],
                         pictures=None)
    (b,) = claim_b(Runner(opts, [], str(tmp_path)))
    assert b["numbers"]["lr_scale_chosen"] == {"sds": 1.0, "asd": 3.0}
    assert b["numbers"]["lr_selection"]["asd"]["seen_psnr_by_scale"] == {"0.3": 22.35, "1": 23.05, "3": 25.05}
    assert b["verdict"] == "holds" and b["numbers"]["asd_minus_sds_change"]["mean_diff"] == 1.0
    assert b["numbers"]["shared_lr"]["verdict"] == "does_not_hold" and b["numbers"]["verdict_differs_from_shared_lr"]
    # every rate is tried on the smallest corpus only; the larger one sees the chosen and the shared rates
    assert {(d, s) for d, n, s, _ in trained if n == 40} == {("sds", 1.0), ("asd", 3.0), ("asd", 1.0)}
    assert {(d, s) for d, n, s, _ in trained if n == 15} == {(d, s) for d in best for s in (0.3, 1.0, 3.0)}
    assert "bench.lr_scales=[0.3,1.0,3.0]" in b["command"]
    with pytest.raises(ScalegenError, match="must hold 1.0"):
        bench_claims(ClaimsOptions(lr_scales=[0.3, 3.0]), [], str(tmp_path))


def test_claims_run_cache_does_not_depend_on_how_out_is_spelled(tmp_path, monkeypatch):
    """A cached run is found again whether --out was given relative or absolute: the corpus path inside a
    run's config (its cache key) is the same absolute path either way."""
    from scalegen.bench.claims import ClaimsOptions, Runner

    monkeypatch.chdir(tmp_path)
    rel = Runner(ClaimsOptions(), [], "out").size_arm("sds", 15, 1.0)[1]
    absolute = Runner(ClaimsOptions(), [], str(tmp_path / "out")).size_arm("sds", 15, 1.0)[1]
    assert rel == absolute and f"data.prompts={tmp_path / 'out' / 'claims' / 'corpora' / 'compose_15.json'}" in rel


def test_claims_calls_on_one_out_split_the_runs_and_train_each_once(tmp_path, monkeypatch):
    """A run whose folder another live process holds is skipped in the first pass (this call trains the
    others meanwhile) and reused in the second, once that process has finished it: never trained twice,
    never removed half-trained."""
    import socket
    import subprocess

    import scalegen.bench.claims as claims
    from scalegen.bench.claims import ClaimsOptions, Runner
    from scalegen.locks import lock_path

    monkeypatch.setattr(claims, "LOCK_POLL_S", 0.05)
    r = Runner(ClaimsOptions(seeds=2, steps=2, eval_prompts=2), [], str(tmp_path))
    arms = {"sds_cfg7.5": claims.MULTIMODAL_ARMS["sds_cfg7.5"], "vsd": claims.MULTIMODAL_ARMS["vsd"]}
    held = r.root / "multimodal" / "sds_cfg7.5-s1"
    holder = subprocess.Popen(["sleep", "60"])  # a live process on this host: its lock is not stale
    lock = lock_path(held)
    lock.parent.mkdir(parents=True)
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "start": 0, "command": "other call"}))
    trained = []

    def fake_train_eval(self, cfg, run_dir, splits=None):
        run_dir.mkdir(parents=True)
        trained.append(run_dir.name)
        if len(trained) == 3:  # this call has trained every free run: the other call finishes its run
            lock.unlink()
            other = Runner(self.opts, [], str(tmp_path))
            other.run("multimodal", "sds_cfg7.5", arms["sds_cfg7.5"], 1)
        return 1.0, {"seen": {"psnr": 20.0 + len(trained)}}

    monkeypatch.setattr(Runner, "train_eval", fake_train_eval)
    try:
        out = r.arms("multimodal", arms)
    finally:
        holder.kill()
    assert trained == ["sds_cfg7.5-s0", "vsd-s0", "vsd-s1", "sds_cfg7.5-s1"]  # the last by the "other call"
    assert [x["metrics"]["seen"]["psnr"] for x in out["sds_cfg7.5"]] == [21.0, 24.0]
    assert not lock.exists() and (held / "result.json").is_file()


def test_claims_rate_overrides_scale_every_generator_rate():
    from scalegen.bench.claims import ClaimsOptions, Runner

    r = Runner(ClaimsOptions(), [], "unused")
    assert r.lr_items("compose", 1.0) == []
    cfg = load_config(r.world_config("compose"), [*r.lr_items("compose", 3.0)])
    base = load_config(r.world_config("compose"))
    assert cfg.optim.lr == pytest.approx(3 * base.optim.lr)
    assert cfg.optim.group_lr == pytest.approx({k: 3 * v for k, v in base.optim.group_lr.items()})
    assert cfg.optim.lr_background == base.optim.lr_background and cfg.distill.lr == base.distill.lr


@pytest.mark.slow
def test_generators_curve_bench_scores_every_checkpoint_and_reuses_the_run(tmp_path):
    """Curve points at step 0 (untrained), every `every` steps and the last step (all prompts), a PNG;
    a second call reuses the finished run (no training), another config in the same folder is an error, an
    interrupted run is scored as far as it got (bench.unfinished) or resumed to the uninterrupted run's curve."""
    import shutil
    from dataclasses import replace

    from scalegen.bench.generators_curve import GeneratorsCurveOptions, bench_generators_curve
    from scalegen.errors import ConfigError

    png = tmp_path / "curves.png"
    opts = GeneratorsCurveOptions(generators=["conv3d"], every=2, curve_prompts=2, plot=str(png))
    res = bench_generators_curve(opts, [*TINY, "train.max_steps=4"], str(tmp_path))
    pts = res["curves"]["conv3d"]
    assert [p["step"] for p in pts] == [0, 2, 4]
    assert all(0 < p["seen_psnr"] < 60 and 0 <= p["unseen_iou"] <= 1 for p in pts)
    assert png.stat().st_size > 0 and res["train"]["conv3d"]["steps"] == 4
    run = tmp_path / "generators-curve" / "conv3d"
    ckpt, cache = run / "checkpoints" / "step_0000004", run / "bench_curve.json"
    mtimes = ckpt.stat().st_mtime, cache.stat().st_mtime
    again = bench_generators_curve(opts, [*TINY, "train.max_steps=4"], str(tmp_path))
    assert (ckpt.stat().st_mtime, cache.stat().st_mtime) == mtimes and again == res  # neither trained nor scored
    cache.unlink()
    rescored = bench_generators_curve(opts, [*TINY, "train.max_steps=4"], str(tmp_path))
    assert rescored["curves"]["conv3d"] == pts  # evaluation is deterministic, so the cache changes nothing
    sparse = bench_generators_curve(replace(opts, score_every=4, plot=""), [*TINY, "train.max_steps=4"], str(tmp_path))
    assert sparse["curves"]["conv3d"] == [pts[0], pts[2]]  # step 0 and the last, read from the same run
    saved = (run / "config.yaml").read_text()
    older = saved.replace("    start_fit_steps: 200\n", "")  # as written before that key existed
    assert older != saved
    (run / "config.yaml").write_text(older)
    assert bench_generators_curve(opts, [*TINY, "train.max_steps=4"], str(tmp_path)) == res  # still this run
    (run / "config.yaml").write_text(saved)
    with pytest.raises(ConfigError, match="holds another run"):
        bench_generators_curve(opts, [*TINY, "train.max_steps=6"], str(tmp_path))
    with pytest.raises(ConfigError, match="multiple of bench.every"):
        bench_generators_curve(replace(opts, score_every=3), [*TINY, "train.max_steps=4"], str(tmp_path))
    (run / "bench_train.json").unlink()  # as if stopped after the checkpoint at step 2
    shutil.rmtree(ckpt)
    part = bench_generators_curve(replace(opts, unfinished=True, plot=""), [*TINY, "train.max_steps=4"], str(tmp_path))
    assert [p["step"] for p in part["curves"]["conv3d"]] == [0, 2] and part["curves"]["conv3d"][0] == pts[0]
    assert part["train"]["conv3d"]["steps"] == 2 and not part["train"]["conv3d"]["finished"]
    assert part["curves"]["conv3d"][1]["seen_psnr"] != pts[1]["seen_psnr"]  # step 2 now scored on all prompts
    resumed = bench_generators_curve(replace(opts, plot=""), [*TINY, "train.max_steps=4"], str(tmp_path))
    assert resumed["curves"]["conv3d"] == pts  # resume is exact: the uninterrupted run's scores
    assert resumed["train"]["conv3d"]["resumed"] and resumed["train"]["conv3d"]["steps"] == 4


@pytest.mark.slow
def test_generate_bench_json(tmp_path):
    """`bench generate` on a tiny run: the JSON the docs table is made from, per case and batch."""
    out = tmp_path / "g.json"
    r = run_cli("bench", "generate", "--out", tmp_path, "--json", out, *TINY, "bench.train_steps=3",
                "bench.cases=[hyper_ingp_32]", "bench.batches=[1,2]", "bench.prompts=2", "bench.threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data.pop("meta")["argv"][:2] == ["bench", "generate"]
    assert set(data) == {"hyper_ingp/32/batch1", "hyper_ingp/32/batch2"}
    for name, v in data.items():
        assert v["resolution"] == 32 and v["batch"] == int(name[-1]) and v["prompts"] == 2
        assert set(v["stages"]) == {"generator", "sdf", "marching_cubes", "colours", "write"}
        assert abs(sum(v["stages"].values()) - v["seconds_per_asset"]) < 0.05 * v["seconds_per_asset"] + 0.01
        assert 0.8 < v["silhouette_iou"] <= 1.0


def test_generate_bench_option_typo_is_one_line():
    bad = run_cli("bench", "generate", "bench.case=[x]")
    assert bad.returncode == 2 and "did you mean 'bench.cases'" in bad.stderr


@pytest.mark.slow
def test_eval_bench_json(tmp_path):
    """`bench eval` on a tiny budget: images/s of CLIP scoring and of rendering per (model, resolution)."""
    pytest.importorskip("open_clip")
    out = tmp_path / "eval.json"
    r = run_cli("bench", "eval", "--json", out, *TINY, "bench.models=[ViT-B-32]", "bench.resolutions=[16,32]",
                "bench.images=4", "bench.batch=4", "bench.prompts=8", "bench.views=2", "bench.threads=1")
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [(c["model"], c["resolution"]) for c in data["cases"]] == [("ViT-B-32", 16), ("ViT-B-32", 32)]
    for c in data["cases"]:
        assert c["score_images_per_s"] > 0 and c["render_images_per_s"] > 0
        assert c["end_to_end_images_per_s"] < min(c["score_images_per_s"], c["render_images_per_s"])
