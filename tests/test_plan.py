"""`scalegen plan`: the saved-activation count against counts done by hand, storages counted once, the
prior's transient, ZeRO-2's partitioning, and the command on the paper config."""
import json

import pytest
import torch
from torch import nn

from scalegen.bench.plan import (GIB, LiveBytes, SavedTensors, measure_step, measure_step_isolated, module_keys,
                                 optimizer_bytes, plan_config, unet_transient)
from scalegen.cli import main
from scalegen.config import load_config

SMALL = ["camera.resolution=16", "render.samples=16", "render.importance_samples=16"]  # oracle steps in seconds


def test_saved_bytes_of_linear_relu_linear_match_a_count_by_hand():
    """Linear(16 -> 32) -> ReLU -> Linear(32 -> 8) on a batch of 5 in fp32, input needing grad. Autograd keeps
    the first Linear's input x [5, 16] (for dW1) and the ReLU's output r [5, 32] (ReLU's backward and the second
    Linear's dW2 read the same tensor: one storage); h = W1 x + b1 is not kept, ReLU saves its result. The
    weights are saved too, but they are parameters, not activations."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(5, 16, requires_grad=True)
    with SavedTensors(module_keys(net)) as saved:
        net(x).sum()
    assert saved.bytes == 4 * (5 * 16 + 5 * 32)
    # without the exclusion the weights W1 [32, 16] and W2 [8, 32] are counted as well
    with SavedTensors() as everything:
        net(x).sum()
    assert everything.bytes == 4 * (5 * 16 + 5 * 32 + 32 * 16 + 8 * 32)


def test_saved_bytes_scale_with_dtype():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).to(torch.bfloat16)
    x = torch.randn(5, 16, dtype=torch.bfloat16, requires_grad=True)
    with SavedTensors(module_keys(net)) as saved:
        net(x)
    assert saved.bytes == 2 * (5 * 16 + 5 * 32)


def test_a_storage_saved_twice_or_through_a_view_counts_once():
    x = torch.randn(6, 10, requires_grad=True)
    w = torch.randn(10, 10)
    with SavedTensors() as saved:
        y = x * 2  # saves nothing of x (a constant factor)
        a = y * y  # y saved (twice, as both operands)
        b = y[:3] * w[:3]  # a view of y's storage and w: w's storage is new, y's is not
        (a.sum() + b.sum())
    assert saved.bytes == 4 * (6 * 10 + 10 * 10)
    # a view saved on its own keeps the whole storage alive: its bytes are the storage's
    big = torch.randn(100, 10, requires_grad=True)
    with SavedTensors() as only_view:
        v = big * 1.0
        (v[:2] * v[:2]).sum()
    assert only_view.bytes == 4 * 100 * 10


def test_parts_add_up_and_parameters_are_excluded():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with SavedTensors(module_keys(conv)) as saved:
        saved.part = "conv"
        h = conv(x)
        saved.part = "act"
        torch.sigmoid(h).sum()
    assert saved.by_part == {"conv": 4 * 2 * 3 * 8 * 8, "act": 4 * 2 * 4 * 8 * 8}
    assert saved.bytes == sum(saved.by_part.values())


def test_live_bytes_tracks_the_peak_of_tensors_alive_together():
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(500)  # +2000 -> 6000
        del a  # -> 2000
        c = torch.empty(3000)  # -> 14000
        v = c[:10]  # a view: no new storage
        del b, c  # c's storage lives on through v
    assert live.peak == 14000
    assert live.current == 12000
    del v
    assert live.current == 0


def test_unet_transient_on_meta_grows_with_rows_and_uses_fused_attention():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=(2, 4), norm_num_groups=32).eval()
    one = unet_transient(unet, "stable_diffusion", 1, 32, 1, torch.float32)
    four = unet_transient(unet, "stable_diffusion", 4, 32, 1, torch.float32)
    assert one > 0 and 3.5 * one <= four <= 4 * one
    # the fused kernel keeps no score matrix: 1 row at 32x32 latents has 1024 tokens, 16 channels per head,
    # so a materialised [heads, 1024, 1024] fp32 score matrix alone would be >= 4 MiB per head
    assert one < 2 * 1024 * 1024 * 4 + 64 * 32 * 32 * 4 * 40


def test_zero2_divides_gradients_and_optimizer_state_by_the_ranks():
    psi = 10_000_000
    one = optimizer_bytes(psi, 2, 1, 2, bf16=False)
    eight = optimizer_bytes(psi, 2, 8, 2, bf16=False)
    assert eight["optimizer_state"] * 8 == one["optimizer_state"] == 2 * 4 * psi
    assert eight["grads"] * 8 == one["grads"] == 4 * psi
    assert eight["params"] == one["params"] == 4 * psi  # ZeRO-2 keeps the whole weights on every rank
    ddp = optimizer_bytes(psi, 2, 8, 0, bf16=False)
    assert ddp["optimizer_state"] == 2 * 4 * psi and ddp["ddp_buckets"] == 4 * psi
    bf = optimizer_bytes(psi, 2, 8, 2, bf16=True)  # ZeRO paper: 2 Psi + (2 Psi + 12 Psi) / N for Adam
    assert bf["params"] + bf["grads"] + bf["master"] + bf["optimizer_state"] == 2 * psi + (2 + 4 + 8) * psi / 8


def test_plan_of_the_oracle_default_counts_adams_two_states_and_zero2_divides_them():
    cfg = load_config(None, ["data.prompts_per_step=2", *SMALL])
    one = plan_config(cfg, cells=False, log=lambda *_: None)
    assert one["optimizer_states_per_param"] == 2.0  # Adam: exp_avg and exp_avg_sq
    assert one["measured"]["saved_bytes"] > 0 and one["measured"]["loss_finite"]
    assert one["parts"]["optimizer_state"] == one["measured"]["optimizer_state_bytes"]
    z = plan_config(cfg, world_size=4, zero=2, cells=False, log=lambda *_: None)
    assert z["parts"]["optimizer_state"] == pytest.approx(one["parts"]["optimizer_state"] / 4, abs=1)
    assert z["parts"]["generator_grads"] == pytest.approx(one["parts"]["generator_grads"] / 4, abs=1)
    assert z["total_bytes"] < one["total_bytes"]


def test_activations_extrapolated_from_one_prompt_match_a_measured_batch():
    """Hyper-iNGP takes another MLP path for one prompt than for several, so the growth per prompt comes from
    2 and 3 prompts; the extrapolation to 4 prompts must match a step measured at 4."""
    cfg = load_config(None, ["data.prompts_per_step=4", *SMALL])
    guessed = plan_config(cfg, measure_prompts=1, cells=False, log=lambda *_: None)
    measured = plan_config(cfg, cells=False, log=lambda *_: None)
    assert guessed["extrapolated"] and not measured["extrapolated"]
    assert guessed["parts"]["activations"] == pytest.approx(measured["parts"]["activations"], rel=0.05)
    # The oracle renders each distinct ground-truth shape of a step once (GroundTruth.draw), so its transient grows
    # with the shapes its random unconditional set happens to hold, not linearly in prompts: the extrapolation is
    # an upper bound there, never an underestimate.
    assert guessed["prior_transient_bytes"] >= 0.95 * measured["prior_transient_bytes"]
    assert guessed["prior_transient_bytes"] <= 2.0 * measured["prior_transient_bytes"]


def test_adan_keeps_four_states_per_parameter():
    cfg = load_config(None, ["data.prompts_per_step=1", "optim.name=adan", "optim.betas=[0.98,0.92,0.99]", *SMALL])
    res = plan_config(cfg, cells=False, log=lambda *_: None)
    assert res["optimizer_states_per_param"] == 4.0  # m, v, n and the previous gradient


def test_plan_command_prints_the_verdicts_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "--json", str(out), "data.prompts_per_step=2", *SMALL]) == 0
    text = capsys.readouterr().out
    for card in ("24 GB", "40 GB", "80 GB"):
        assert card in text
    res = json.loads(out.read_text())
    assert set(res["cells"]) == {"fp32", "fp32 + ckpt", "bf16", "bf16 + ckpt"}
    assert res["total_bytes"] == sum(res["parts"].values())
    assert res["fits"]["80GB"] and res["total_bytes"] < 80 * GIB


def test_plan_command_rejects_a_bad_rank_count_in_one_line():
    from conftest import run_cli

    for flag in ("--num-processes", "--measure-prompts"):
        r = run_cli("plan", flag, "0", "--no-table")
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert f"{flag}: must be at least 1, got 0" in r.stderr


@pytest.mark.slow
def test_plan_of_the_mg15_paper_config_prints_24_40_80_verdicts(tmp_path, capsys):
    out = tmp_path / "mg15.json"
    assert main(["plan", "--config", "configs/sd/hyper_ingp_asd_mg15.yaml", "--no-table", "--no-growth",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "24GB" in text and "40GB" in text and "80GB" in text
    res = json.loads(out.read_text())
    # the published SD 2.1-base: UNet 865.9M, VAE 83.7M parameters at fp16, text tower 340.4M at fp32
    assert res["frozen"]["unet_params"] == 865_910_724
    assert res["parts"]["prior"] == 2 * (res["frozen"]["unet_params"] + res["frozen"]["vae_params"])
    assert res["measured"]["unet_rows"] == 5  # ASD's 3 branches + Perp-Neg's 2 negatives for one image
    assert res["parts"]["activations"] > 0 and res["prior_transient_bytes"] > 0 and res["backward_transient_bytes"] > 0


def test_without_growth_steps_the_largest_batch_is_a_conservative_proportional_bound(capsys):
    cfg = load_config(None, ["data.prompts_per_step=2", *SMALL])
    res = plan_config(cfg, cells=False, growth=False, log=lambda *_: None)
    grown = plan_config(cfg, cells=False, log=lambda *_: None)
    assert res["growth"] is None and res["total_bytes"] == pytest.approx(grown["total_bytes"], rel=0.02)
    # the oracle shares its prior transient across the batch: in proportion it is over-counted, never under
    assert 0 < res["max_prompts_per_step"]["24GB"] <= grown["max_prompts_per_step"]["24GB"]
    assert main(["plan", "--no-growth", "--measure-prompts", "1", "--no-table", "data.prompts_per_step=2"]) == 2
    assert "--no-growth" in capsys.readouterr().err


def test_a_step_measured_in_its_own_process_counts_what_one_measured_here_counts():
    cfg = load_config(None, ["data.prompts_per_step=1", *SMALL])
    here, apart = measure_step(cfg, 1), measure_step_isolated(cfg, 1)
    for key in ("saved_bytes", "activation_bytes", "retained_bytes", "prior_transient_bytes", "saved_by_part"):
        assert apart[key] == here[key], key
    assert apart["process_peak_rss_bytes"] > apart["activation_bytes"]


@pytest.mark.slow
def test_table_cells_measured_in_their_own_processes_count_what_in_process_cells_count():
    """A paper config's cells are measured each in a fresh process (so one cell's left-over heap cannot add to the
    next one's peak); the counts must not depend on where they were taken."""
    cfg = load_config("configs/oracle/conv3d.yaml", ["data.prompts_per_step=1", "generator.preset=small", *SMALL])
    here = plan_config(cfg, growth=False, log=lambda *_: None, isolate_cells=False)
    apart = plan_config(cfg, growth=False, log=lambda *_: None, isolate_cells=True)
    assert set(apart["cells"]) == {"fp32", "fp32 + ckpt", "bf16", "bf16 + ckpt"}
    for name, cell in apart["cells"].items():
        assert cell["activation_bytes"] == here["cells"][name]["activation_bytes"], name
        assert cell["total_bytes"] == here["cells"][name]["total_bytes"], name
        assert cell["measured_process_peak_rss_bytes"] > cell["activation_bytes"]
    # conv3d honours checkpointing: its trunk keeps less for backward
    assert apart["cells"]["fp32 + ckpt"]["activation_bytes"] < apart["cells"]["fp32"]["activation_bytes"]
