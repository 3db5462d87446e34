"""Benchmarks: ``scalegen bench NAME [--json FILE] [bench.OPTION=value ...] [key=value ...]``.

Each benchmark declares its options as a typed dataclass (``<Name>Options`` in its module); the
command line's ``bench.<option>=value`` items are checked against it exactly like config keys (an
unknown option names the closest ones), and every other ``key=value`` is an override of the
training config the benchmark runs. Each benchmark prints a table and returns the figures for
``--json`` (with a ``meta`` entry: command, date, commit); committed as docs/results/NAME.json (docs/benchmarks.md).

``BENCHES`` is the one list of benchmarks: a new one is a module with its options class and function,
and one row there. The bench room sits on the top floor beside the command line: it imports the rooms
it measures, never ``scalegen.cli``.
"""
from __future__ import annotations

import importlib

from scalegen.config import parse_options
from scalegen.errors import ScalegenError

# Every benchmark: name -> (module, its options dataclass, its function(options, overrides, out_root) -> dict).
# Imported only when run (some need the [sd] extra); the command line's choices and help come from here.
BENCHES: dict[str, tuple[str, str, str]] = {
    "saturation": ("scalegen.bench.saturation", "SaturationOptions", "bench_saturation"),
    "sharpness": ("scalegen.bench.sharpness", "SharpnessOptions", "bench_sharpness"),
    "guidance": ("scalegen.bench.guidance", "GuidanceOptions", "bench_guidance"),
    "flops-sd": ("scalegen.bench.flops_sd", "FlopsOptions", "bench_flops_sd"),
    "flops-mvdream": ("scalegen.bench.flops_mvdream", "FlopsMVDreamOptions", "bench_flops_mvdream"),
    "data": ("scalegen.bench.data", "DataOptions", "bench_data"),
    "distill": ("scalegen.bench.distill", "DistillOptions", "bench_distill"),
    "toy2d": ("scalegen.bench.toy2d", "Toy2DOptions", "bench_toy2d"),
    "generators": ("scalegen.bench.generators", "GeneratorsOptions", "bench_generators"),
    "generators-curve": ("scalegen.bench.generators_curve", "GeneratorsCurveOptions", "bench_generators_curve"),
    "generate": ("scalegen.bench.generate", "GenerateBenchOptions", "bench_generate"),
    "eval": ("scalegen.bench.clip_eval", "EvalOptions", "bench_eval"),
    "clip-agreement": ("scalegen.bench.clip_agreement", "ClipAgreementOptions", "bench_clip_agreement"),
    "refine": ("scalegen.bench.refine", "RefineBenchOptions", "bench_refine"),
    "claims": ("scalegen.bench.claims", "ClaimsOptions", "bench_claims"),
    "oracle-cost": ("scalegen.bench.oracle_cost", "OracleCostOptions", "bench_oracle_cost"),
    "step": ("scalegen.bench.step", "StepOptions", "bench_step"),
    "paper-step": ("scalegen.bench.paper_step", "PaperStepOptions", "bench_paper_step"),
    "gpu": ("scalegen.bench.gpu", "GpuOptions", "bench_gpu"),
}
NAMES = tuple(BENCHES)


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(``bench.*`` options, config overrides) of a command line's ``key=value`` items."""
    opts = [o for o in items if o.startswith("bench.")]
    return opts, [o for o in items if not o.startswith("bench.")]


def run_bench(name: str, items: list[str], out_root: str = "runs/bench") -> dict:
    if name not in BENCHES:
        raise ScalegenError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
    options, overrides = split_overrides(items)
    module_name, options_name, function_name = BENCHES[name]
    module = importlib.import_module(module_name)
    cls, function = getattr(module, options_name), getattr(module, function_name)
    opts = parse_options(cls, options, "bench", f"`scalegen bench {name}` takes the options of "
                         f"{cls.__module__}.{cls.__name__}")
    return function(opts, overrides, out_root)
