"""Benchmarks: ``scalegen bench NAME``. Each prints a table and returns the figures for --json.
Numbers and the commands that produced them go to docs/performance.md."""
from __future__ import annotations

from scalegen.errors import ScalegenError

NAMES = ("saturation", "sharpness", "guidance", "flops-sd", "data", "distill", "toy2d", "generators", "generate")


def run_bench(name: str, overrides: list[str], out_root: str = "runs/bench") -> dict:
    if name == "saturation":
        from scalegen.bench.saturation import bench_saturation  # noqa: PLC0415

        return bench_saturation(overrides, out_root)
    if name == "sharpness":
        from scalegen.bench.sharpness import bench_sharpness  # noqa: PLC0415

        return bench_sharpness(overrides, out_root)
    if name == "guidance":
        from scalegen.bench.guidance import bench_guidance  # noqa: PLC0415

        return bench_guidance(overrides)
    if name == "flops-sd":
        from scalegen.bench.flops_sd import bench_flops_sd  # noqa: PLC0415

        return bench_flops_sd(overrides)
    if name == "distill":
        from scalegen.bench.distill import bench_distill  # noqa: PLC0415

        return bench_distill(overrides, out_root)
    if name == "toy2d":
        from scalegen.bench.toy2d import bench_toy2d  # noqa: PLC0415

        return bench_toy2d(overrides)
    if name == "data":
        from scalegen.bench.data import bench_data  # noqa: PLC0415

        return bench_data(overrides, out_root)
    if name == "generators":
        from scalegen.bench.generators import bench_generators  # noqa: PLC0415

        return bench_generators(overrides)
    if name == "generate":
        from scalegen.bench.generate import GenerateBenchOptions, bench_generate, parse_bench_options  # noqa: PLC0415

        opts, rest = parse_bench_options(GenerateBenchOptions, overrides)
        return bench_generate(opts, rest, out_root)
    raise ScalegenError(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}")
