"""`bench paper-step` and `bench gpu` at reduced size: the same code paths as the true-size runs, and
the paper-step checks fail when they should (a group that gets no gradient, a resumed step one ulp
off, a non-finite loss)."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from scalegen.bench.paper_step import (check_config, finite_losses, groups_changed, identical, memory_levers,
                                       prediction_overrides, ran_out_of_memory, resolve_configs)
from scalegen.cli import main
from scalegen.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_groups_changed_reports_a_frozen_group():
    before = {"a": torch.zeros(3), "b": torch.ones(2), "c": torch.ones(1)}
    after = {"a": torch.tensor([0.0, 1e-30, 0.0]), "b": torch.ones(2), "c": torch.ones(1)}
    r = groups_changed(before, after, {"moved": ["a", "c"], "frozen": ["b"]})
    assert r["moved"]["changed"] and r["moved"]["changed_tensors"] == 1 and r["moved"]["tensors"] == 2
    assert not r["frozen"]["changed"] and r["frozen"]["max_abs_change"] == 0.0


def test_identical_sees_one_ulp_in_weights_and_optimizer_state():
    a = {"w": torch.ones(4), "opt": {"state": {0: {"exp_avg": torch.zeros(2), "step": torch.tensor(2.0)}},
                                     "param_groups": [{"lr": 1e-3, "params": [0]}]}}
    assert identical(a, copy.deepcopy(a)) == []
    b = copy.deepcopy(a)
    b["w"][2] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    assert identical(a, b) == ["w"]
    c = copy.deepcopy(a)
    c["opt"]["state"][0]["exp_avg"][1] = -0.0 + 1e-45
    c["opt"]["param_groups"][0]["lr"] = 2e-3
    assert identical(a, c) == ["opt.state.0.exp_avg", "opt.param_groups[0].lr"]
    d = copy.deepcopy(a)
    d["w"] = d["w"].double()  # same values, another dtype: not the same state
    assert identical(a, d) == ["w"]


def test_finite_losses():
    assert finite_losses([{"loss": 1.0}, {"loss": 2.0}]) == (True, [1.0, 2.0])
    assert not finite_losses([{"loss": 1.0}, {"loss": float("nan")}])[0]
    assert not finite_losses([{"loss": float("inf")}])[0]
    assert not finite_losses([])[0]  # no loss logged is not a pass


def test_configs_option_names_paper_configs():
    assert len(resolve_configs([])) == 8
    assert resolve_configs(["conv3d_asd_df415"]) == [str(ROOT / "configs/sd/conv3d_asd_df415.yaml")]
    with pytest.raises(ConfigError, match="not a paper config"):
        resolve_configs(["conv3d_asd_df416"])


def test_checkpointing_is_turned_on_only_where_the_predicted_step_does_not_fit():
    gib = 2**30
    over = {"predicted_step_bytes": 30 * gib}
    levers, notes = memory_levers("conv3d", False, "auto", over, 23 * gib)
    assert levers == ["generator.checkpointing=true"]
    assert "bench.checkpointing=auto" in notes[0] and "30.0 GiB" in notes[0] and "23.0 GiB" in notes[0]
    assert "prompts per step unchanged" in notes[0]
    assert memory_levers("conv3d", False, "auto", {"predicted_step_bytes": 20 * gib}, 23 * gib) == ([], [])
    assert memory_levers("conv3d", False, "auto", {"plan_error": "x"}, 23 * gib) == ([], [])  # no prediction
    assert memory_levers("hyper_ingp", False, "auto", over, 23 * gib) == ([], [])  # it has no checkpointing
    assert memory_levers("conv3d", True, "auto", over, 23 * gib) == ([], [])  # the config has it already
    assert memory_levers("conv3d", False, "never", over, 23 * gib) == ([], [])
    levers, notes = memory_levers("triplane_transformer", False, "always", {}, 23 * gib)
    assert levers == ["generator.checkpointing=true"] and "bench.checkpointing=always" in notes[0]


def test_a_plan_that_runs_out_of_memory_itself_turns_checkpointing_on():
    """The plan's step holds less than the run (no UNet weights): when it cannot be held, neither can the run."""
    gib = 2**30
    oom = {"plan_out_of_memory": True, "plan_peak_rss_bytes": 18.7 * gib, "plan_error": "killed by signal 9: ..."}
    levers, notes = memory_levers("conv3d", False, "auto", oom, 23 * gib)
    assert levers == ["generator.checkpointing=true"] and "ran out of this machine's memory at 18.7 GiB" in notes[0]
    assert memory_levers("conv3d", False, "never", oom, 23 * gib) == ([], [])
    assert ran_out_of_memory(-9, "") and ran_out_of_memory(-6, "terminate called after throwing std::bad_alloc")
    assert ran_out_of_memory(1, "RuntimeError: DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes")
    assert not ran_out_of_memory(2, "error: scalegen plan does not count VSD's LoRA backward through the UNet yet")


def test_the_prediction_plans_the_published_prior_at_the_runs_dtype():
    items = ["prior.model=runs/w/sd21-base-random", "data.prompts=x.json"]
    assert prediction_overrides(items, "true", "fp32") == ["data.prompts=x.json", "prior.dtype=fp32"]
    assert prediction_overrides(items, "reduced", "bf16") == [*items, "prior.dtype=bf16"]  # the tiny prior is loaded


@pytest.mark.slow
def test_paper_step_reduced_turns_checkpointing_on_when_the_budget_is_short(tmp_path):
    """A budget below the plan's prediction: the conv3d run takes generator.checkpointing=true, says why, and
    still passes every check (checkpointing changes no value)."""
    out = tmp_path / "ps.json"
    rc = main(["bench", "paper-step", "--out", str(tmp_path / "runs"), "--json", str(out), "bench.scale=reduced",
               f"bench.weights={tmp_path / 'w'}", "bench.configs=[conv3d_asd_df415]", "bench.memory_gib=0.01"])
    assert rc == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["memory_levers"] == ["generator.checkpointing=true"]
    assert row["predicted_step_bytes"] > row["memory_budget_bytes"] == int(0.01 * 2**30)
    assert any(n.startswith("generator.checkpointing=true (bench.checkpointing=auto)") for n in row["notes"])
    assert "bench.memory_gib=0.01" in row["command"]
    assert row["ok"] and row["resumed_identical"] and row["params_changed"]


@pytest.mark.slow
def test_paper_step_reduced_checks_fail_when_they_should(tmp_path):
    """Two steps + a resume through the real loop and checkpoints at reduced size. With the random
    backdrop drawn every step (bg_random_prob=1) the background gets no gradient: the check says so;
    then a resumed checkpoint one ulp off, and a NaN loss, each fail their check."""
    out, runs = tmp_path / "ps.json", tmp_path / "runs"
    rc = main(["bench", "paper-step", "--out", str(runs), "--json", str(out), "bench.scale=reduced",
               f"bench.weights={tmp_path / 'w'}", "bench.configs=[hyper_ingp_vdm_mg15]", "render.bg_random_prob=1.0"])
    assert rc == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert row["exit_code"] == 0 and row["peak_rss_bytes"] > 100 * 2**20
    assert row["losses_finite"] and len(row["losses"]) == 2
    assert row["resumed_identical"] and row["resume_differences"] == []
    assert not row["groups"]["background"]["changed"]
    others = {n: g for n, g in row["groups"].items() if n != "background"}
    assert set(others) >= {"grid", "hypernet", "distiller (vdm, step 2)"}, others
    assert all(g["changed"] for g in others.values())
    assert not row["params_changed"] and not res["ok"]
    assert any("background unchanged" in n for n in row["check_notes"])
    assert row["step_s"]["2"]["cpu"] > 0 and row["step_s"]["2"]["wall"] > 0

    work = runs / "paper_step" / "reduced" / "hyper_ingp_vdm_mg15"
    spec = json.loads((work / "spec.json").read_text())
    child = json.loads((work / "child_result.json").read_text())
    plan = {"overrides": spec["overrides"]}
    assert check_config(spec["config"], plan, child, work)["resumed_identical"]
    resumed = work / "run_resumed" / "checkpoints" / "step_0000002" / "model.safetensors"
    w = load_file(str(resumed))
    key = next(k for k in w if k.startswith("model.generator."))
    flat = w[key].view(-1)
    flat[0] = torch.nextafter(flat[0], flat[0] + 1)
    save_file(w, str(resumed))
    # a valid checkpoint whose weights differ (not a damaged file): its recorded digest follows the new bytes
    from scalegen.train.checkpoint import file_sha256

    state_path = resumed.parent / "state.json"
    state = json.loads(state_path.read_text())
    state["files"]["model.safetensors"] = file_sha256(resumed)
    state_path.write_text(json.dumps(state))
    bad = check_config(spec["config"], plan, child, work)
    assert not bad["resumed_identical"] and bad["resume_differences"] == [key]
    nan_child = copy.deepcopy(child)
    nan_child["metrics_uninterrupted"][-1]["loss"] = math.nan
    assert not check_config(spec["config"], plan, nan_child, work)["losses_finite"]


def test_bench_gpu_reduced_runs_on_cpu(tmp_path, capsys):
    """`scalegen bench gpu --json F bench.scale=reduced`: the GPU bench's whole path on a CPU."""
    out = tmp_path / "gpu.json"
    rc = main(["bench", "gpu", "--json", str(out), "bench.scale=reduced", "--out", str(tmp_path / "runs"),
               f"bench.weights={tmp_path / 'w'}", "bench.configs=[hyper_ingp_asd_mg15]"])
    assert rc == 0
    res = json.loads(out.read_text())
    row = res["rows"][0]
    assert len(row["step_s_all"]) == 3 and row["step_s_median"] > 0
    assert all(math.isfinite(x) for x in row["losses"])
    # scalegen plan's prediction of the same run (tiny prior at bf16, its own process), caches less than the total
    assert res["plan_available"] is True and "plan_error" not in row["plan"], row["plan"]
    assert 0 < row["predicted_step_bytes"] < row["predicted_peak_bytes"]
    assert row["predicted_peak_bytes"] - row["predicted_step_bytes"] == row["plan"]["predicted_text_cache_bytes"]
    assert "prior.dtype=bf16" in row["plan"]["plan_command"] and "--no-table" in row["plan"]["plan_command"]
    assert row["flops"]["step_flops"] > 1e10  # flops-sd counts the true-size SD (at the reduced resolutions)
    assert row["achieved_tflops"] == pytest.approx(row["flops"]["step_flops"] / row["step_s_median"] / 1e12)
    assert res["generate"]["hyper_ingp"]["32"]["seconds_per_asset"] > 0
    assert "skipped" in res["gsplat"]
    assert "| hyper_ingp_asd_mg15 |" in capsys.readouterr().out


# The wheels a GPU machine with only torch, accelerate, transformers, peft, safetensors, scikit-image and
# einops needs for `bench gpu` (docs/paper-scale.md, "Running the GPU bench"): distribution names.
GPU_WHEELS = {"diffusers", "requests", "urllib3", "certifi", "charset-normalizer", "idna", "webdataset",
              "braceexpand", "trimesh", "open-clip-torch"}
# Imported when present, never needed: accelerate/transformers/diffusers probe for them; trimesh uses
# xxhash when it can; huggingface_hub's HTTP client (httpx2/httpcore2) tries brotli and sniffio.
OPTIONAL = {"deepspeed", "hjson", "msgpack", "ninja", "py-cpuinfo", "pydantic", "pydantic-core", "annotated-types",
            "typing-inspection", "torchvision", "protobuf", "googleapis-common-protos", "xxhash", "scalegen", "pillow",
            "nvidia-ml-py", "einops", "brotli", "sniffio"}
BASE = ["torch", "accelerate", "transformers", "peft", "safetensors", "scikit-image", "einops"]

CLOSURE = r"""
import json, re, sys
from importlib import metadata
from scalegen.cli import main
rc = main(sys.argv[1:])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
seen, todo = set(), list(json.loads(sys.stdin.readline()))
while todo:
    n = norm(todo.pop())
    if n in seen:
        continue
    seen.add(n)
    try:
        reqs = metadata.requires(n) or []
    except metadata.PackageNotFoundError:
        continue
    todo += [re.split(r"[ ;<>=!~\[(]", r, maxsplit=1)[0] for r in reqs if "extra ==" not in r]
dists = metadata.packages_distributions()
used = sorted({norm(d) for m in list(sys.modules) for d in dists.get(m.split(".")[0], [])} - seen)
print(json.dumps({"rc": rc, "wandb": any(m == "wandb" or m.startswith("wandb.") for m in sys.modules),
                  "beyond_base": used}))
"""


@pytest.mark.slow
def test_bench_gpu_import_path_stays_lean(tmp_path):
    """Run the reduced GPU bench in a fresh process (both priors, the shards config, fresh tiny weights so
    the tokenizer writer runs too) and list the distributions it imported beyond the GPU machine's base
    set: all in GPU_WHEELS or optional probes, and no wandb."""
    pytest.importorskip("webdataset")
    configs = "bench.configs=[conv3d_asd_cp100k_shards,triplane_asd_dl17k]"
    r = subprocess.run([sys.executable, "-c", CLOSURE, "bench", "gpu", "bench.scale=reduced", "--out", str(tmp_path),
                        f"bench.weights={tmp_path / 'w'}", configs],
                       input=json.dumps(BASE) + "\n", capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0 and not res["wandb"]
    unexpected = set(res["beyond_base"]) - GPU_WHEELS - OPTIONAL
    assert not unexpected, f"bench gpu imports {sorted(unexpected)}: add the wheels to docs/paper-scale.md or drop them"
