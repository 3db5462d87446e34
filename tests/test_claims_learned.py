"""`scalegen bench claims bench.prior=learned`: the claims against the learned prior (bench/claims.py), with tiny
learned priors trained in seconds and the distillation runs themselves faked (the slow test runs them)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli
from scalegen.config import parse_options
from scalegen.errors import ScalegenError

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

# the learned prior's bank at one view per prompt, two images a step
TINY = ["learned.views_per_prompt=1", "learned.batch=2", "learned.ckpt_every=2"]


def _opts(**kw):
    from scalegen.bench.claims import ClaimsOptions

    base = dict(seeds=2, steps=2, eval_prompts=2, pictures=None, prior="learned", learned_size="tiny",
                learned_steps=2, learned_minutes=0.0)
    return ClaimsOptions(**{**base, **kw})


def test_prior_option_is_parsed_and_validated():
    from scalegen.bench.claims import ClaimsOptions, learned_options, learned_refusal, option_items

    opts = parse_options(ClaimsOptions, ["bench.prior=learned", "bench.learned_steps=5", "bench.learned_minutes=30"],
                         "bench", "claims")
    assert (opts.prior, opts.learned_steps, opts.learned_minutes, opts.learned_size) == ("learned", 5, 30.0, "small")
    assert ClaimsOptions().prior == "exact"
    with pytest.raises(ScalegenError, match="bench.prior"):
        parse_options(ClaimsOptions, ["bench.prior=oracle"], "bench", "claims")
    with pytest.raises(ScalegenError, match="needs bench.prior=learned"):
        learned_options(ClaimsOptions(), ["learned.threads=1"])
    with pytest.raises(ScalegenError, match="bench.learned_steps"):
        learned_options(_opts(), ["learned.steps=3"])
    with pytest.raises(ScalegenError, match="must be >= 1"):
        learned_options(_opts(learned_steps=0), [])
    lo = learned_options(_opts(threads=1), ["learned.views_per_prompt=3"])
    assert (lo.size, lo.steps, lo.minutes, lo.threads, lo.views_per_prompt, lo.progress) == ("tiny", 2, 0.0, 1, 3, False)
    assert learned_options(_opts(threads=1), ["learned.threads=2"]).threads == 2
    assert "bench.prior=learned" in option_items(_opts())
    for arm in (["prior.oracle.mode=camera_aware"], ["prior.oracle.view_prompts=true"],
                ["prior.oracle.view_prompts=true", "prior.perp_neg=0.5"]):
        why = learned_refusal(arm)
        assert why and "\n" not in why
    assert learned_refusal(["distill.name=sds", "prior.oracle.mode=view_agnostic"]) == ""


def _fake_metrics(cfg) -> dict:
    s = cfg.train.seed
    m = {"psnr": 20.0 + s, "color_error": 0.1 if cfg.distill.guidance_scale > 50 else 0.01 * s, "multi_face": 0.3,
         "marker_recall": 0.5, "psnr_mean": 18.0, "psnr_mean_gt": 17.0}
    return {k: dict(m) for k in ("seen", "seen_front", "seen_underspecified", "unseen_attribute")}


def test_learned_claims_train_each_worlds_prior_once_and_keep_their_runs_apart(tmp_path, monkeypatch, capsys):
    """bench.prior=learned trains one tiny prior per world (claims a and e share the multimodal one), reuses it on
    a second call, distils every run from it in claims/learned/, and its rows carry the prior; claim f's remedies
    are rows that say in one line why they are not defined; a merge keeps the exact row of the same claim."""
    from scalegen.bench import claims
    from scalegen.priors import build_prior
    from scalegen.priors.learned import LearnedPrior

    trained, runs = [], []
    real = claims.train_learned

    def counting(cfg, o, out, log):
        trained.append(out.name)
        return real(cfg, o, out, log)

    def fake_train_eval(self, cfg, run_dir, splits=None):
        prior = build_prior(cfg)  # the run's own config loads its world's learned prior (world, text, size checked)
        assert isinstance(prior, LearnedPrior) and cfg.prior.model.endswith(f"learned_priors/{run_dir.parent.name}")
        run_dir.mkdir(parents=True)
        runs.append(run_dir)
        return 1.0, _fake_metrics(cfg)

    monkeypatch.setattr(claims, "train_learned", counting)
    monkeypatch.setattr(claims.Runner, "train_eval", fake_train_eval)
    merged = tmp_path / "claims.json"
    merged.write_text(json.dumps({"claims": [{"id": "a", "claim": "x", "verdict": "holds", "numbers": {}}]}))
    opts = _opts(claims=["a", "e", "f"], merge=str(merged))
    res = claims.bench_claims(opts, TINY, str(tmp_path))
    assert trained == ["multimodal", "front"]
    assert len(runs) == 2 * (3 + 3 + 1)  # a: 3 arms, e: 3 more (2 are a's), f: the view-agnostic arm only; 2 seeds
    root = tmp_path / "claims"
    assert all(p.parent.parent == root / "learned" for p in runs) and not (root / "multimodal").exists()
    assert sorted(p.name for p in (root / "learned_priors").iterdir()) == ["front", "multimodal"]
    rows = {x["id"]: x for x in res["claims"] if x.get("prior") == "learned"}
    assert set(rows) == {"a", "e", "f1", "f2", "f3", "f4"}
    assert rows["a"]["verdict"] in ("holds", "does_not_hold", "inconclusive")
    lp = rows["a"]["learned_prior"]
    assert lp["steps_trained"] == 2 and lp["size"] == "tiny" and lp["resolution"] == 24 and lp["views_per_prompt"] == 1
    assert lp["options"]["minutes"] == 0.0 and rows["f1"]["learned_prior"]["dir"].endswith("learned_priors/front")
    assert "bench.prior=learned" in rows["a"]["command"] and "learned.views_per_prompt=1" in rows["a"]["command"]
    out = capsys.readouterr().out
    for cid in ("f2", "f3", "f4"):
        why = rows[cid]["not_defined_because"]
        assert rows[cid]["verdict"] == "not_defined" and "\n" not in why
        assert why.startswith(f"{cid} is not defined for the learned prior: ") and why in out
    assert [(x["id"], x.get("prior", "exact")) for x in json.loads(merged.read_text())["claims"]][:2] == \
        [("a", "exact"), ("a", "learned")]

    claims.bench_claims(_opts(claims=["a"]), TINY, str(tmp_path))  # a second call: nothing trained again
    assert trained == ["multimodal", "front"] and len(runs) == 14
    assert "reusing the learned prior" in capsys.readouterr().out

    with pytest.raises(ScalegenError, match="not defined for the learned prior"):  # no oracle-only arm runs on it
        claims.Runner(opts, TINY, str(tmp_path)).run("front", "camera_aware", ["prior.oracle.mode=camera_aware"], 0)


def test_another_learned_budget_continues_the_prior_and_retrains_its_runs(tmp_path, monkeypatch):
    """A longer bench.learned_steps continues the same prior (it is another prior now), so the runs distilled
    from the shorter one are not reused."""
    from scalegen.bench import claims

    runs = []

    def fake_train_eval(self, cfg, run_dir, splits=None):
        run_dir.mkdir(parents=True)
        runs.append(run_dir)
        return 1.0, _fake_metrics(cfg)

    monkeypatch.setattr(claims.Runner, "train_eval", fake_train_eval)
    claims.bench_claims(_opts(claims=["a"]), TINY, str(tmp_path))
    res = claims.bench_claims(_opts(claims=["a"], learned_steps=4), TINY, str(tmp_path))
    assert len(runs) == 12 and res["claims"][0]["learned_prior"]["steps_trained"] == 4
    rec = json.loads((tmp_path / "claims" / "learned_priors" / "multimodal" / "bench_learned.json").read_text())
    assert [t["step"] for t in rec["trainings"]] == [2, 4]
    with pytest.raises(ScalegenError, match="other world, camera, render or text settings"):  # the runs' config changed
        claims.bench_claims(_opts(claims=["a"], learned_steps=4), [*TINY, "camera.fovy_range=[30,50]"], str(tmp_path))


@pytest.mark.slow
def test_bench_claims_against_the_learned_prior_end_to_end(tmp_path):
    """The command line, real runs: claim a at two steps distilled from a tiny learned prior."""
    merged = tmp_path / "claims.json"
    cmd = ["bench", "claims", "--out", tmp_path, "bench.claims=[a]", "bench.steps=2", "bench.eval_prompts=2",
           "bench.pictures=" + str(tmp_path / "pics"), f"bench.merge={merged}", "bench.prior=learned",
           "bench.learned_size=tiny", "bench.learned_steps=2", *TINY]
    r = run_cli(*cmd)
    assert r.returncode == 0, r.stderr[-2000:]
    (row,) = json.loads(merged.read_text())["claims"]
    assert row["prior"] == "learned" and row["verdict"] in ("holds", "does_not_hold", "inconclusive")
    assert row["learned_prior"]["steps_trained"] == 2 and (tmp_path / "pics" / "a-learned.png").stat().st_size > 0
    for res in (tmp_path / "claims" / "learned" / "multimodal").glob("*/result.json"):
        assert json.loads(res.read_text())["prior"] == "learned"
    r = run_cli(*cmd)
    assert r.returncode == 0 and r.stdout.count("reusing") == 1 + 6  # the prior, 3 arms x 2 seeds
