"""Benchmarks: ``scalegen bench NAME [--json FILE] [bench.OPTION=value ...] [key=value ...]``.

Each benchmark declares its options as a typed dataclass (``<Name>Options`` in its module); the
command line's ``bench.<option>=value`` items are checked against it exactly like config keys (an
unknown option names the closest ones), and every other ``key=value`` is an override of the
training config the benchmark runs. Each benchmark prints a table and returns the figures for
``--json``; numbers and the commands that produced them go to docs/performance.md.

The bench room sits on the top floor beside the command line: it imports the rooms it measures,
never ``scalegen.cli``.
"""
from __future__ import annotations

from scalegen.config import parse_options
from scalegen.errors import ScalegenError

NAMES = ("saturation", "sharpness", "guidance", "flops-sd", "flops-mvdream", "data", "distill", "toy2d", "generators",
         "generators-curve", "generate", "eval", "refine", "claims", "oracle-cost", "paper-step", "gpu")


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    """(``bench.*`` options, config overrides) of a command line's ``key=value`` items."""
    opts = [o for o in items if o.startswith("bench.")]
    return opts, [o for o in items if not o.startswith("bench.")]


def run_bench(name: str, items: list[str], out_root: str = "runs/bench") -> dict:
    options, overrides = split_overrides(items)

    def parse(cls):
        return parse_options(cls, options, "bench", f"`scalegen bench {name}` takes the options of "
                             f"{cls.__module__}.{cls.__name__}")

    if name == "saturation":
        from scalegen.bench.saturation import SaturationOptions, bench_saturation  # noqa: PLC0415

        return bench_saturation(parse(SaturationOptions), overrides, out_root)
    if name == "sharpness":
        from scalegen.bench.sharpness import SharpnessOptions, bench_sharpness  # noqa: PLC0415

        return bench_sharpness(parse(SharpnessOptions), overrides, out_root)
    if name == "guidance":
        from scalegen.bench.guidance import GuidanceOptions, bench_guidance  # noqa: PLC0415

        return bench_guidance(parse(GuidanceOptions), overrides, out_root)
    if name == "flops-sd":
        from scalegen.bench.flops_sd import FlopsOptions, bench_flops_sd  # noqa: PLC0415

        return bench_flops_sd(parse(FlopsOptions), overrides, out_root)
    if name == "flops-mvdream":
        from scalegen.bench.flops_mvdream import FlopsMVDreamOptions, bench_flops_mvdream  # noqa: PLC0415

        return bench_flops_mvdream(parse(FlopsMVDreamOptions), overrides, out_root)
    if name == "distill":
        from scalegen.bench.distill import DistillOptions, bench_distill  # noqa: PLC0415

        return bench_distill(parse(DistillOptions), overrides, out_root)
    if name == "toy2d":
        from scalegen.bench.toy2d import Toy2DOptions, bench_toy2d  # noqa: PLC0415

        return bench_toy2d(parse(Toy2DOptions), overrides, out_root)
    if name == "data":
        from scalegen.bench.data import DataOptions, bench_data  # noqa: PLC0415

        return bench_data(parse(DataOptions), overrides, out_root)
    if name == "generators":
        from scalegen.bench.generators import GeneratorsOptions, bench_generators  # noqa: PLC0415

        return bench_generators(parse(GeneratorsOptions), overrides, out_root)
    if name == "generators-curve":
        from scalegen.bench.generators_curve import GeneratorsCurveOptions, bench_generators_curve  # noqa: PLC0415

        return bench_generators_curve(parse(GeneratorsCurveOptions), overrides, out_root)
    if name == "generate":
        from scalegen.bench.generate import GenerateBenchOptions, bench_generate  # noqa: PLC0415

        return bench_generate(parse(GenerateBenchOptions), overrides, out_root)
    if name == "eval":
        from scalegen.bench.clip_eval import EvalOptions, bench_eval  # noqa: PLC0415

        return bench_eval(parse(EvalOptions), overrides, out_root)
    if name == "refine":
        from scalegen.bench.refine import RefineBenchOptions, bench_refine  # noqa: PLC0415

        return bench_refine(parse(RefineBenchOptions), overrides, out_root)
    if name == "claims":
        from scalegen.bench.claims import ClaimsOptions, bench_claims  # noqa: PLC0415

        return bench_claims(parse(ClaimsOptions), overrides, out_root)
    if name == "oracle-cost":
        from scalegen.bench.oracle_cost import OracleCostOptions, bench_oracle_cost  # noqa: PLC0415

        return bench_oracle_cost(parse(OracleCostOptions), overrides, out_root)
    if name == "paper-step":
        from scalegen.bench.paper_step import PaperStepOptions, bench_paper_step  # noqa: PLC0415

        return bench_paper_step(parse(PaperStepOptions), overrides, out_root)
    if name == "gpu":
        from scalegen.bench.gpu import GpuOptions, bench_gpu  # noqa: PLC0415

        return bench_gpu(parse(GpuOptions), overrides, out_root)
    raise ScalegenError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
