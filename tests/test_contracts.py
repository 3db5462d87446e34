"""What the code promises in its docstrings, each checked against an independent computation:
Hyper-iNGP's shared-points MLP backward and the sparse interpolation backward against autograd,
ASD's call wiring (annealed t_min in dt, the cap at 999, one t and dt per view group), the
regularisers and the learning-rate factor at hand-computed points, image metrics on hand-built
masks, and iNGP hash indices from the published primes."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY
from scalegen.config import load_config, schedule_value
from scalegen.data.cameras import orbit_cameras
from scalegen.distill import ASD, TimestepSchedule, build_distiller
from scalegen.priors.fakes import LinearPrior


# --- Hyper-iNGP's fused MLP and the feature grids' sparse interpolation ----------------------------------


def test_shared_points_mlp_backward_matches_autograd():
    """relu(feat W1_b) W2_b for all prompts at shared points, chunked, with a hand-written backward."""
    from scalegen.generators.hyper_ingp import _SharedPointsMLP

    torch.manual_seed(0)
    b, n, f, h, o = 3, 100, 6, 5, 4
    feat = torch.randn(n, f, requires_grad=True)
    w1 = torch.randn(b, f, h, requires_grad=True)
    w2 = torch.randn(b, h, o, requires_grad=True)
    out = _SharedPointsMLP.apply(feat, w1, w2, 7)  # chunks of 7 points, the last one short
    ref = torch.bmm(torch.relu(torch.bmm(feat.expand(b, -1, -1), w1)), w2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, [feat, w1, w2], g)
    want = torch.autograd.grad(ref, [feat, w1, w2], g)
    for name, a, r in zip(("feat", "w1", "w2"), got, want):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["voxel", "triplane"])
def test_sparse_interp_backward_matches_grid_sample(kind):
    """The shared-points interpolation (a sparse matrix product with a hand-written transpose
    product as backward) against grid_sample's autograd, for voxel grids and planes."""
    from scalegen.generators.fields import PLANE_AXES, sample_planes, sample_voxels, shared_interp

    torch.manual_seed(0)
    b, c = 2, 3
    shape = (b, c, 5, 6, 7) if kind == "voxel" else (b, 3, c, 6, 7)
    grid = torch.randn(shape, requires_grad=True)
    unit = (torch.rand(200, 3) * 2 - 1) * 1.1  # some points outside [-1, 1]: zero padding
    if kind == "voxel":
        got = shared_interp(grid, unit).transpose(0, 1)  # [B, N, C]
        ref = sample_voxels(grid, unit.expand(b, -1, -1))
    else:
        got = torch.cat([shared_interp(grid[:, i], unit[:, list(ax)]) for i, ax in enumerate(PLANE_AXES)],
                        -1).transpose(0, 1)
        ref = sample_planes(grid, unit.expand(b, -1, -1))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (g_got,) = torch.autograd.grad(got, grid, g)
    (g_ref,) = torch.autograd.grad(ref, grid, g)
    torch.testing.assert_close(g_got, g_ref, atol=1e-5, rtol=1e-5)
    assert g_ref.abs().sum() > 0


# --- ASD's call wiring -------------------------------------------------------------------------------------


def _record(asd: ASD):
    """Capture the (t, t + dt) ASD hands to its gradient."""
    seen = []
    real = asd.gradient

    def grad(latents, text, cameras, t, t2, eps):
        seen.append((t.clone(), t2.clone()))
        return real(latents, text, cameras, t, t2, eps)

    asd.gradient = grad
    return seen


def _asd_step(asd: ASD, step: int, n: int = 64):
    z = torch.randn(n, 1, 2, 2, requires_grad=True)
    cams = orbit_cameras(n, 0.0, 1.5, 50.0, 2)
    asd(z, torch.zeros(n, dtype=torch.long), cams, step)


def test_asd_dt_uses_the_annealed_t_min():
    """dt = floor(U min(eta (t - t_min_now), 999 - t)) with t_min_now the anneal's lower end at this
    step: with t_min = t at step 0 every dt is 0; at the end t_min = 20 and dt reaches past what the
    start's t_min would allow."""
    eta = 0.5
    asd = ASD(LinearPrior(), TimestepSchedule([0.6, 0.6], [0.02, 0.6], None, 100), eta=eta)
    seen = _record(asd)
    _asd_step(asd, 0)
    t, t2 = seen[-1]
    assert (t == 600).all() and (t2 == t).all()
    for _ in range(5):
        _asd_step(asd, 100)
    t = torch.cat([a for a, _ in seen[1:]])
    dt = torch.cat([b for _, b in seen[1:]]) - t
    cap = torch.minimum(eta * (t - 20).float(), (999 - t).float())
    assert (dt >= 0).all() and (dt <= torch.floor(cap)).all()
    assert (dt > (eta * (t - 600)).clamp(min=0)).any()  # only the annealed t_min = 20 allows these


def test_asd_dt_cap_keeps_t_plus_dt_from_piling_up_at_999():
    """The reference caps eta (t - t_min) at 999 - t BEFORE the uniform factor, so t + dt is spread
    over [t, 999]; clamping after the draw would put most of these draws exactly at 999."""
    asd = ASD(LinearPrior(), TimestepSchedule([0.95, 0.99], [0.95, 0.99], None, 10), eta=1.0)
    seen = _record(asd)
    for _ in range(8):
        _asd_step(asd, 0)
    t = torch.cat([a for a, _ in seen])
    t2 = torch.cat([b for _, b in seen])
    assert (t2 <= 999).all() and (t2 >= t).all()
    assert (t2 == 999).float().mean() < 0.2


def test_asd_one_t_and_one_dt_per_view_group_from_the_config():
    """distill.t_per=prompt: the views of one prompt share t (MVDream's 4-view groups) and dt."""
    cfg = load_config(None, ["distill.name=asd", "distill.t_per=prompt", "camera.views_per_prompt=4",
                             "distill.asd_eta=0.5", "distill.t_range_start=[0.2, 0.98]"])
    asd = build_distiller(cfg, LinearPrior())
    assert asd.t_group == 4
    seen = _record(asd)
    _asd_step(asd, 0, n=32)
    t, t2 = seen[0]
    assert (t.view(8, 4) == t.view(8, 4)[:, :1]).all() and ((t2 - t).view(8, 4) == (t2 - t).view(8, 4)[:, :1]).all()
    assert len(t.unique()) > 1 and len((t2 - t).unique()) > 1  # groups differ from each other
    per_image = build_distiller(load_config(None, ["distill.name=asd", "camera.views_per_prompt=4"]), LinearPrior())
    assert per_image.t_group == 1


def test_one_prior_call_declares_asd_branches_and_the_cfg_pair():
    """ASD's three branches go to the prior in one call; only [cond @ t, uncond @ t] is a CFG pair."""
    prior = LinearPrior()
    asd = ASD(prior, TimestepSchedule([0.5, 0.98], [0.02, 0.5], None, 10))
    _asd_step(asd, 3, n=4)
    assert prior.calls == [12]
    g = prior.guidance[0]
    assert g.uncond.tolist() == [False] * 4 + [True] * 4 + [False] * 4
    assert g.pairs.tolist() == [[i, 4 + i] for i in range(4)]


# --- regularisers and the learning-rate factor ----------------------------------------------------------------


def test_regularisers_at_hand_computed_points():
    from scalegen.train.loop import regularisers

    cfg = load_config(None, ["loss.eikonal=2.0", "loss.sparsity=3.0", "loss.opacity_entropy=[0, 0.0, 4.0, 10]",
                             "train.max_steps=100"])
    o = torch.tensor([0.5, 0.0, 1.0, 0.2]).view(1, 1, 2, 2)
    out = SimpleNamespace(rgb=torch.zeros(1, 3, 2, 2), opacity=o, eikonal=torch.tensor(0.25))
    total, logs = regularisers(cfg, out, step=5)
    sparsity = (math.sqrt(0.25 + 0.01) + math.sqrt(0.01) + math.sqrt(1.01) + math.sqrt(0.04 + 0.01)) / 4

    def h(p):
        p = min(max(p, 1e-4), 1 - 1e-4)
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    entropy = (h(0.5) + h(0.0) + h(1.0) + h(0.2)) / 4
    lam_ent = 4.0 * 5 / 10  # the ramp from step 0 to step 10 is halfway at step 5
    assert float(logs["sparsity"]) == pytest.approx(sparsity, rel=1e-5)
    assert float(logs["opacity_entropy"]) == pytest.approx(entropy, rel=1e-4)
    assert float(total) == pytest.approx(2.0 * 0.25 + 3.0 * sparsity + lam_ent * entropy, rel=1e-4)
    _, logs0 = regularisers(cfg, out, step=0)  # the entropy weight is 0 at step 0: not computed, not logged
    assert "opacity_entropy" not in logs0


def test_lr_factor_at_hand_computed_points():
    from scalegen.train.loop import lr_factor

    cfg = load_config(None, ["train.max_steps=10", "optim.warmup_steps=4", "optim.lr_schedule=cosine",
                             "optim.min_lr_ratio=0.1"])
    cosine = lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 10))  # noqa: E731
    assert lr_factor(cfg, 0) == pytest.approx(0.25 * cosine(0))
    assert lr_factor(cfg, 2) == pytest.approx(0.75 * cosine(2))
    assert lr_factor(cfg, 5) == pytest.approx(cosine(5)) == pytest.approx(0.55)
    assert lr_factor(cfg, 10) == pytest.approx(0.1)
    half = load_config(None, ["train.max_steps=10", "optim.warmup_steps=0.5"])  # a fraction: 5 steps
    assert lr_factor(half, 0) == pytest.approx(0.2) and lr_factor(half, 4) == pytest.approx(1.0)


def test_step_position_one_means_step_one_everywhere():
    """The edge 1.0: one step (not the whole run) in ramps, the warm-up and the t anneal alike."""
    from scalegen.train.loop import lr_factor

    assert schedule_value([0, 0.0, 1.0, 1.0], 1, 100) == 1.0
    assert schedule_value([0, 0.0, 1.0, 0.99], 1, 100) == pytest.approx(1 / 99)
    assert lr_factor(load_config(None, ["train.max_steps=100", "optim.warmup_steps=1.0"]), 0) == 1.0
    assert TimestepSchedule([0.5, 0.98], [0.02, 0.5], 1.0, 100).range(1) == (20, 500)


# --- image metrics -------------------------------------------------------------------------------------------


def test_image_metrics_on_hand_built_masks():
    from scalegen.eval.oracle import image_metrics

    gt_op = torch.zeros(1, 1, 4, 4)
    gt_op[..., :2, :] = 1.0  # top half: 8 pixels
    pred_op = torch.zeros(1, 1, 4, 4)
    pred_op[..., :, :2] = 1.0  # left half: 8 pixels, 4 shared
    gt = torch.full((1, 3, 4, 4), 0.5)
    gt[..., :2, :] = 0.75  # the object, 0.25 from grey
    pred = gt.clone()
    pred[..., :2, :2] = 0.95  # over-saturated inside both masks (0.45 from grey)
    pred[..., 2:, :2] = 0.6  # predicted object where the truth is backdrop
    m = image_metrics(pred, pred_op, gt, gt_op)
    assert float(m["iou"][0]) == pytest.approx(4 / 12)
    assert float(m["color_error"][0]) == pytest.approx(0.45 - 0.25)  # both masks: the 4 shared pixels
    mse = (4 * 0.2**2 + 4 * 0.1**2) * 3 / 48  # per channel, over the whole image
    assert float(m["psnr"][0]) == pytest.approx(-10 * math.log10(mse), rel=1e-5)
    mse_fg = (4 * 0.2**2 + 4 * 0.1**2) * 3 / (12 * 3)  # over the union of the masks
    assert float(m["psnr_fg"][0]) == pytest.approx(-10 * math.log10(mse_fg), rel=1e-5)
    empty = image_metrics(pred, torch.zeros_like(pred_op), gt, torch.zeros_like(gt_op))
    assert float(empty["iou"][0]) == 1.0 and not bool(empty["has_object"][0])  # nothing to miss


# --- the iNGP hash ----------------------------------------------------------------------------------------------


def test_hash_indices_from_the_published_primes():
    """Instant-NGP: vertex (x, y, z) of a hashed level goes to (x * 1 ^ y * 2654435761 ^ z * 805459861)
    mod T, in uint32 arithmetic; computed here with Python integers."""
    from scalegen.generators.hash_grid import HashGrid

    g = HashGrid(n_levels=2, n_features=1, log2_size=8, base_resolution=4, max_resolution=40)
    level = 1
    assert not bool(g.dense[level])  # (40 + 1)^3 vertices do not fit 2^8 rows: hashed
    res = int(g.resolution[level])
    for v in [(0, 0, 0), (1, 2, 3), (17, 5, 39), (40, 40, 40), (3, 31, 7)]:
        want = ((v[0] * 1) ^ (v[1] * 2654435761) ^ (v[2] * 805459861)) % 2**32 % 2**8
        x = torch.tensor([v], dtype=torch.float32) / res
        idx, w = g.corner_indices(x)
        corner = int(w[:, 0, level].argmax())
        assert float(w[corner, 0, level]) == 1.0
        assert int(idx[corner, 0, level]) - int(g.level_offset[level]) == want, v


# --- mixed precision and process counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("generator", ["hyper_ingp", pytest.param("conv3d", marks=pytest.mark.slow),
                                       pytest.param("triplane_transformer", marks=pytest.mark.slow)])
def test_bf16_mixed_precision_trains_on_cpu(tmp_path, generator):
    """train.mixed_precision=bf16 runs the generator and renderer under CPU autocast; losses stay finite.
    (A fresh process: accelerate's state is one per process and the other tests train in fp32.)"""
    import json
    import subprocess
    import sys

    small = [] if generator == "hyper_ingp" else ["generator.preset=small", "optim.group_lr={}"]
    r = subprocess.run([sys.executable, "-m", "scalegen.cli", "train", "--out", str(tmp_path / "bf16"), *TINY,
                        f"generator.name={generator}", *small, "train.max_steps=3", "train.mixed_precision=bf16",
                        "train.log_every=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(x) for x in (tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(math.isfinite(x["loss"]) for x in lines)


@pytest.mark.parametrize("new_world", [1, 3])
def test_prompt_positions_map_to_another_process_count_without_skipping_or_repeating(new_world):
    """Two ranks read part of epoch 0 (rank 1 further: it finished its share and wrapped into epoch 1);
    on 1 or 3 ranks epoch 0 goes on with exactly the prompts nobody read; the one prompt of epoch 1 that
    rank 1 had read is the only repeat, and the note says so."""
    from scalegen.data.prompts import PromptSampler

    prompts = [f"p{i}" for i in range(41)]  # rank 0 of 2 holds 21 positions per epoch, rank 1 holds 20
    olds, read = {}, {}
    for r, steps in ((0, 3), (1, 7)):
        s = PromptSampler(prompts, 3, seed=5, rank=r, world_size=2)
        read[r] = [p for _ in range(steps) for p in s.next_batch().prompts]
        olds[str(r)] = s.state_dict()
    assert (olds["0"]["epoch"], olds["1"]["epoch"], olds["1"]["cursor"]) == (0, 1, 1)
    epoch0_read = read[0] + read[1][:20]
    news = [PromptSampler(prompts, 3, seed=5, rank=r, world_size=new_world) for r in range(new_world)]
    notes = [n.remap(olds, 2) for n in news]
    assert notes[0].startswith(f"data position mapped from 2 to {new_world} process(es): epoch 0 continues with "
                               "the 12 of its 41 prompts") and "1 prompt(s) of epoch 1" in notes[0]
    rest = [n.prompts[i] for n in news for i in n._order]
    assert sorted(epoch0_read + rest) == sorted(prompts)  # nothing skipped, nothing read twice
    again = PromptSampler(prompts, 3, seed=5, rank=0, world_size=new_world)
    again.load_state_dict(news[0].state_dict())  # the mapped position survives a checkpoint
    assert again._order == news[0]._order
    nxt = news[0]
    for _ in range(10):
        nxt.next_batch()
    assert nxt.epoch >= 1 and nxt.skip_epoch == 0  # later epochs read the whole corpus again


def test_shard_positions_map_to_another_process_count(tmp_path):
    """Shards: the finished shards of the epoch are not read again after the mapping, every other shard
    of it is, and the shard group each rank was in the middle of is re-read from its start."""
    from scalegen.data.shards import build_shards, write_manifest
    from scalegen.data.stream import ShardStream

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"prompt {i}" for i in range(120)))
    res = build_shards(str(corpus), tmp_path / "sh", None, shard_size=5, log=lambda m: None)  # 24 shards
    write_manifest(str(corpus), tmp_path / "sh", res["plans"], res["report"], res["encoder"])
    olds, read = {}, []
    for r in range(2):  # 12 shards each, groups of 2 shards (10 prompts): 21 prompts = 2 groups + 1
        s = ShardStream(str(tmp_path / "sh"), batch_size=7, rank=r, world_size=2, shuffle_shards=2)
        read += [p for _ in range(3) for p in s.next_batch().prompts]
        olds[str(r)] = s.state_dict()
    assert [(st["group"], st["offset"]) for st in olds.values()] == [(2, 1), (2, 1)]
    new = ShardStream(str(tmp_path / "sh"), batch_size=1, rank=0, world_size=1, shuffle_shards=2)
    note = new.remap(olds, 2)
    assert note == ("data position mapped from 2 to 1 process(es): epoch 0 continues with the 16 of its 24 shards "
                    "no process had finished; 2 sample(s) of shard groups that processes were in the middle of "
                    "will be read again")
    rest = []
    while True:
        b = new.next_batch()
        if new.epoch != 0:
            break
        rest += b.prompts
    assert len(rest) == 80 and set(read) | set(rest) == {f"prompt {i}" for i in range(120)}
    assert len(read) + len(rest) - len(set(read) | set(rest)) == 2  # the two re-read group starts


def test_checkpoints_from_before_the_distiller_had_its_own_optimizer_still_resume():
    """Old checkpoints hold one optimizer over [generator groups, distiller groups]; split, each part loads
    into its optimizer with exactly the moments it had."""
    from scalegen.train.loop import split_optimizer_state

    gen = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    dis = [torch.nn.Parameter(torch.randn(4))]
    old = torch.optim.Adam([{"params": gen[:1], "lr": 0.1, "name": "grid"}, {"params": gen[1:], "lr": 0.2},
                            {"params": dis, "lr": 0.3, "name": "distill_vdm_psi"}])
    for p in (*gen, *dis):
        p.grad = torch.randn_like(p)
    old.step()
    parts = split_optimizer_state(old.state_dict(), n_generator_groups=2)
    g = torch.optim.Adam([{"params": gen[:1], "lr": 0.1}, {"params": gen[1:], "lr": 0.2}])
    d = torch.optim.Adam([{"params": dis, "lr": 0.3}])
    g.load_state_dict(parts["generator"])
    d.load_state_dict(parts["distiller"])
    assert torch.equal(g.state[gen[1]]["exp_avg"], old.state[gen[1]]["exp_avg"])
    assert torch.equal(d.state[dis[0]]["exp_avg_sq"], old.state[dis[0]]["exp_avg_sq"])
    assert d.param_groups[0]["name"] == "distill_vdm_psi"
