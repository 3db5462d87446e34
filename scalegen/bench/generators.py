"""``scalegen bench generators``: forward + backward time and peak memory of the paper-size
3DConv-Net and Triplane-Transformer on this machine's CPU, at batch 1 and 4.

Each case runs in a fresh subprocess so its peak resident set size (``ru_maxrss``) is its own.
One step = generator forward (text -> feature grid) + a shared-point query of ``points`` points
per prompt (a small render's worth) + backward of the mean SDF and colour. A batch-4 case is
skipped, with the reason in the table, when batch 1's peak extrapolated to batch 4 would not fit
in 70% of the memory available now (other jobs share this machine).

Options: ``GeneratorsOptions`` (``bench.points=N``, ``bench.threads=N``, ``bench.generators=[conv3d,...]``,
``bench.batches=[1, 4]``, ``bench.checkpointing=true``, ``bench.bf16=true``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal

from scalegen.errors import ConfigError

CASES = {"conv3d": ("conv3d", 1), "conv3d_x2": ("conv3d", 2), "triplane_transformer": ("triplane_transformer", 1)}


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def run_case(case: str, batch: int, points: int, threads: int, checkpointing: bool, bf16: bool) -> dict:
    """One measurement in this process (called in a fresh subprocess by ``bench_generators``)."""
    import resource  # noqa: PLC0415
    import time  # noqa: PLC0415

    import torch  # noqa: PLC0415

    from scalegen.generators import Conv3DNet, TriplaneTransformer  # noqa: PLC0415
    from scalegen.text import TextCond  # noqa: PLC0415

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    name, mult = CASES[case]
    text_dim, n_tokens = 1024, 77  # SD 2.1's OpenCLIP width and token count
    if name == "conv3d":
        gen = Conv3DNet(text_dim, "paper", mult, checkpointing=checkpointing, bf16=bf16)
    else:
        gen = TriplaneTransformer(text_dim, "paper", checkpointing=checkpointing, bf16=bf16)
    gen.train()
    cond = TextCond(torch.randn(batch, text_dim), torch.randn(batch, n_tokens, text_dim),
                    torch.ones(batch, n_tokens, dtype=torch.bool))
    pts = (torch.rand(1, points, 3) * 2 - 1) * gen.bound
    base = _rss_gb()
    t0 = time.perf_counter()
    sdf, rgb = gen(cond).query(pts)
    loss = sdf.mean() + rgb.mean()
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"generator": case, "batch": batch, "params": sum(p.numel() for p in gen.parameters()),
            "forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t2 - t0, "model_rss_gb": base,
            "peak_rss_gb": peak, "step_peak_gb": peak - base}


def _subprocess(args: dict) -> dict:
    code = ("import json, sys; from scalegen.bench.generators import run_case; "
            "print('RESULT ' + json.dumps(run_case(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"generator": args["case"], "batch": args["batch"], "skipped": f"failed (exit {proc.returncode}): {tail[0]}"}


@dataclass
class GeneratorsOptions:
    points: int = 4096  # shared query points per prompt (a small render's worth)
    threads: int = 1
    generators: list[Literal["conv3d", "conv3d_x2", "triplane_transformer"]] = field(
        default_factory=lambda: list(CASES))
    batches: list[int] = field(default_factory=lambda: [1, 4])
    checkpointing: bool = False
    bf16: bool = False


def bench_generators(options: GeneratorsOptions, overrides: list[str], out_root: str = "") -> dict:
    if overrides:
        raise ConfigError(f"`scalegen bench generators` builds paper-size generators without a training config, so "
                          f"'{overrides[0]}' means nothing here; its options are bench.<name>=value (GeneratorsOptions)")
    opts = asdict(options)
    rows = []
    for case in opts["generators"]:
        one = None
        for batch in opts["batches"]:
            if one is not None and "skipped" not in one and batch > one["batch"]:
                need = one["model_rss_gb"] + one["step_peak_gb"] * batch / one["batch"]
                avail = _available_gb()
                if need > 0.7 * avail:
                    rows.append({"generator": case, "batch": batch, "skipped":
                                 f"needs ~{need:.1f} GB (batch-{one['batch']} peak x {batch}), "
                                 f"{avail:.1f} GB available"})
                    print(f"{case} batch {batch}: {rows[-1]['skipped']}", flush=True)
                    continue
            if _available_gb() < 6.0:
                rows.append({"generator": case, "batch": batch,
                             "skipped": f"only {_available_gb():.1f} GB available (needs >= 6 GB to start)"})
                continue
            r = _subprocess({"case": case, "batch": batch, "points": opts["points"], "threads": opts["threads"],
                             "checkpointing": opts["checkpointing"], "bf16": opts["bf16"]})
            print(json.dumps(r), flush=True)
            rows.append(r)
            if one is None:
                one = r
    print(f"\npaper size, {opts['points']} shared query points per prompt, {opts['threads']} thread(s), "
          f"checkpointing={opts['checkpointing']}, bf16={opts['bf16']}")
    print(f"{'generator':22} {'batch':>5} {'params':>12} {'fwd s':>8} {'bwd s':>8} {'step s':>8} "
          f"{'model GB':>9} {'peak GB':>8} {'step GB':>8}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['generator']:22} {r['batch']:>5}  skipped: {r['skipped']}")
        else:
            print(f"{r['generator']:22} {r['batch']:>5} {r['params']:>12,} {r['forward_s']:>8.1f} "
                  f"{r['backward_s']:>8.1f} {r['step_s']:>8.1f} {r['model_rss_gb']:>9.2f} "
                  f"{r['peak_rss_gb']:>8.2f} {r['step_peak_gb']:>8.2f}")
    return {"options": opts, "results": rows}
