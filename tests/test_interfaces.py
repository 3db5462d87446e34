"""The interfaces between the rooms are declared, not implied (docs/architecture.md): each test here
fails if a contract goes back to being an undeclared convention (a caller branching on which class it
holds, an option silently swallowed, a name list written twice)."""
from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch

from conftest import TINY
from scalegen.config import load_config

PACKAGE = Path(__file__).resolve().parents[1] / "scalegen"


def _calls_isinstance_on(path: Path, names: set[str]) -> list[str]:
    """``isinstance(x, C)`` calls in ``path`` whose class argument names one of ``names``."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance" and len(node.args) == 2:
            used = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
            if used & names:
                hits.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return hits


# --- samplers: one Batch from both, behind Sampler --------------------------------------------------------


def test_both_samplers_are_samplers_and_return_a_batch(tmp_path):
    from scalegen.data.prompts import PromptSampler
    from scalegen.data.sampler import Batch, Sampler
    from scalegen.data.shards import build_shards, write_manifest
    from scalegen.data.stream import ShardStream

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"prompt {i}" for i in range(10)))
    res = build_shards(str(corpus), tmp_path / "sh", None, shard_size=5, log=lambda m: None)
    write_manifest(str(corpus), tmp_path / "sh", res["plans"], res["report"], res["encoder"])
    prompts = [f"prompt {i}" for i in range(10)]
    for s in (PromptSampler(prompts, 3, seed=1), ShardStream(str(tmp_path / "sh"), batch_size=3)):
        assert isinstance(s, Sampler)
        b = s.next_batch()
        assert isinstance(b, Batch) and len(b.prompts) == len(b.keys) == 3
        assert set(b.prompts) <= set(prompts) and b.cond is None and s.info is None
    keys = PromptSampler(prompts, 4, seed=1).next_batch()
    assert [prompts[int(k)] for k in keys.keys] == keys.prompts  # the in-memory sampler's keys: corpus positions


def test_the_loop_reads_batches_without_asking_which_sampler_gave_them():
    from scalegen.data.prompts import PromptSampler
    from scalegen.priors.fakes import LinearPrior
    from scalegen.text import build_text_encoder
    from scalegen.train.loop import BatchEncoder

    cfg = load_config(None, TINY)
    te = build_text_encoder(cfg)
    sampler = PromptSampler(["a small red cube", "a large blue sphere"], 2)
    prompts, cond, prior_text = BatchEncoder(cfg, te, LinearPrior(), "cpu", sampler)(sampler.next_batch())
    assert len(prompts) == 2 and cond.pooled.shape[0] == 2 and prior_text.shape[0] == 2
    assert not _calls_isinstance_on(PACKAGE / "train" / "loop.py", {"list", "Batch", "PromptSampler", "ShardStream"})


# --- backgrounds ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["env", "solid"])
def test_backgrounds_are_background_modules_whose_bind_gives_a_backdrop(kind):
    from scalegen.render import Background, build_background
    from scalegen.text import TextCond

    bg = build_background(load_config(None, [*TINY, f"render.background={kind}"]), 8)
    assert isinstance(bg, Background) and type(bg).bind is not Background.bind
    cond = TextCond(pooled=torch.randn(3, 8), tokens=torch.randn(3, 1, 8), mask=torch.ones(3, 1, dtype=torch.bool))
    with torch.no_grad():
        rgb = bg.eval().bind(cond)(torch.nn.functional.normalize(torch.randn(1, 2, 5, 3), dim=-1))
    assert rgb.shape == (3, 2, 5, 3) and float(rgb.min()) >= 0 and float(rgb.max()) <= 1


def test_scene_model_takes_declared_parts():
    from scalegen.generators import Generator
    from scalegen.render import Background
    from scalegen.train.model import SceneModel

    hints = inspect.signature(SceneModel.__init__).parameters
    assert hints["generator"].annotation == "Generator" and hints["background"].annotation == "Background"
    assert Generator and Background  # the names the annotations refer to exist where train.model imports them


# --- the oracle worlds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["single", "compositional"])
def test_both_oracle_worlds_implement_the_world_interface(kind):
    from scalegen.priors import World, build_world

    over = [] if kind == "single" else ["world.kind=compositional", "text.word_order=rotary", "world.n_prompts=8",
                                        "world.n_eval=2"]
    world = build_world(load_config(None, over))
    assert isinstance(world, World)
    required = [n for n, f in vars(World).items() if callable(f) and not n.startswith("_")
                and "raise NotImplementedError" in inspect.getsource(f)]
    assert set(required) == {"splits", "parse", "index", "completions", "component_field", "uncond_set",
                             "background"}
    for name in required:
        assert getattr(type(world), name) is not getattr(World, name), f"{type(world).__name__} lacks {name}"
    splits = world.splits()
    assert next(iter(splits)) == "seen" and splits["seen"] == world.seen
    p = world.seen[0]
    comps = world.completions([world.index(p)])[0]
    assert world.component_field(comps[:1]).n_prompts == 1
    assert world.marker_of(p) is None or len(world.marker_of(p)) == 2


# --- a prior's ground truth ---------------------------------------------------------------------------------


def test_the_oracle_declares_its_ground_truth_and_learned_priors_have_none():
    from scalegen.data.cameras import orbit_cameras
    from scalegen.priors import GroundTruth, build_ground_truth, build_prior
    from scalegen.priors.fakes import LinearPrior

    cfg = load_config(None, TINY)
    prior = build_prior(cfg)
    truth = prior.ground_truth()
    assert isinstance(truth, GroundTruth) and truth.world is prior.world
    cams = orbit_cameras(2, 15.0, 1.25, 40.0, 16)
    prompts = truth.world.seen[:2]
    want = prior.render([truth.world.index(p) for p in prompts], cams)
    assert torch.equal(truth.render(prompts, cams), want)
    again = build_ground_truth(cfg, truth.world)  # without building the prior: the same pictures
    assert torch.equal(again.render(prompts, cams), want)
    assert LinearPrior().ground_truth() is None
    sd = load_config(None, ["prior.name=stable_diffusion", "data.prompts=" + str(PACKAGE.parent / "README.md")])
    assert build_ground_truth(sd) is None  # decided from the config; no weights are looked for


def test_ground_truth_is_read_through_the_interface_only():
    """Nobody outside the oracle reaches into a prior for its renderer or asks which prior it is."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        text = path.read_text()
        if rel.parts[0] != "priors" and ("gt_source" in text or "prior.renderer" in text):
            offenders.append(f"{rel}: reads a prior's renderer")
        if ('prior.name == "oracle"' in text or 'prior.name != "oracle"' in text) and str(rel) != "priors/__init__.py":
            offenders.append(f"{rel}: checks prior.name instead of Prior.ground_truth / build_ground_truth")
    assert not offenders, "\n".join(offenders)


# --- renderers: explicit options --------------------------------------------------------------------------


def _gaussians():
    from scalegen.render import GaussianField

    g = 16
    return GaussianField(torch.rand(g, 3) * 0.4 - 0.2, torch.full((g, 3), math.log(0.08)), torch.randn(g, 4),
                         torch.full((g,), 2.0), torch.rand(g, 1, 3))


@pytest.mark.parametrize("option", ["samples", "importance_samples", "perturb"])
def test_an_option_the_gaussian_rasterizer_does_not_take_is_an_error(option):
    from scalegen.data.cameras import orbit_cameras
    from scalegen.render import GaussianRasterizer

    ren = GaussianRasterizer()
    cams = orbit_cameras(2, 15.0, 1.5, 40.0, 8)
    message = rf"GaussianRasterizer\.forward\(\) got an unexpected keyword argument '{option}'"
    with pytest.raises(TypeError, match=message):
        ren(_gaussians(), cams, **{option: 8})
    assert ren.eval_options(32, 16) == {}
    out = ren(_gaussians(), cams, **ren.eval_options(32, 16))  # what evaluation passes: nothing to swallow
    assert out.rgb.shape == (2, 3, 8, 8)


def test_volsdf_takes_its_options_explicitly():
    from scalegen.render import Renderer, VolSDFRenderer

    ren = VolSDFRenderer()
    assert ren.eval_options(32, 16) == {"perturb": False, "samples": 32, "importance_samples": 16}
    params = inspect.signature(VolSDFRenderer.forward).parameters
    assert {"samples", "importance_samples", "perturb", "composite"} <= set(params)
    for cls in (Renderer, VolSDFRenderer, *Renderer.__subclasses__()):
        kinds = {p.kind for p in inspect.signature(cls.forward).parameters.values()}
        assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{cls.__name__}.forward takes **options again"


# --- cameras are typed ----------------------------------------------------------------------------------------


def test_every_cameras_parameter_is_typed():
    untyped = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for a in node.args.args + node.args.kwonlyargs:
                    typed = a.annotation is not None and "Cameras" in ast.unparse(a.annotation)
                    if a.arg in ("cameras", "cams") and not typed:
                        untyped.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}({a.arg})")
    assert not untyped, "\n".join(untyped)


# --- CLIP evaluation's view sources ------------------------------------------------------------------------------


def test_clip_view_sources_share_a_base_and_evaluation_does_not_branch_on_them():
    from scalegen.eval.clip import FolderViews, RunViews, ViewSource

    assert issubclass(FolderViews, ViewSource) and issubclass(RunViews, ViewSource)
    assert inspect.signature(__import__("scalegen.eval.clip", fromlist=["x"]).evaluate_clip).parameters[
        "source"].annotation == "ViewSource"
    assert not _calls_isinstance_on(PACKAGE / "eval" / "clip.py", {"FolderViews", "RunViews"})


# --- one name list per kind ----------------------------------------------------------------------------------------


def _defines(module: str) -> set[str]:
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


def test_every_bench_row_names_a_module_with_its_options_and_function():
    from scalegen.bench import BENCHES, NAMES

    assert NAMES == tuple(BENCHES)
    for name, (module, options, function) in BENCHES.items():
        assert module.startswith("scalegen.bench."), name
        assert {options, function} <= _defines(module), f"bench {name}: {module} lacks {options} or {function}"
    # plan.py is `scalegen plan` (the memory plan), on the bench floor for the published prior configs
    modules = {p.stem for p in (PACKAGE / "bench").glob("*.py")} - {"__init__", "common", "plan"}
    listed = {m.rsplit(".", 1)[1] for m, _, _ in BENCHES.values()}
    assert modules == listed, f"bench modules not in BENCHES: {sorted(modules - listed)}"


def test_the_command_line_offers_exactly_the_name_lists(capsys):
    from scalegen.bench import NAMES
    from scalegen.cli import main
    from scalegen.config import DISTILLERS, PER_PROMPT
    from scalegen.eval.clip import PROTOCOLS

    def help_of(*argv) -> str:
        with pytest.raises(SystemExit):
            main([*argv, "--help"])
        return " ".join(capsys.readouterr().out.split())

    text = help_of("bench")
    assert all(n in text for n in NAMES)
    text = help_of("eval", "clip")
    assert all(n in text for n in PROTOCOLS)
    text = help_of("refine")
    assert all(n in text for n in (*PER_PROMPT, *DISTILLERS))
    with pytest.raises(SystemExit) as e:
        main(["bench", "nope"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_building_the_parser_imports_no_torch():
    import subprocess
    import sys

    code = "import sys; from scalegen.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)  # a fresh interpreter
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-1000:]


def test_generator_and_distiller_names_have_one_list_each():
    import typing

    from scalegen import config
    from scalegen.distill import build_distiller
    from scalegen.generators import conv3d, triplane_transformer
    from scalegen.priors.fakes import LinearPrior
    from scalegen.refine import PRESETS, REPRESENTATIONS

    hints = typing.get_type_hints(config.GeneratorConfig)
    assert typing.get_args(hints["name"]) == config.AMORTIZED + config.PER_PROMPT
    assert typing.get_args(hints["preset"]) == config.GENERATOR_PRESETS
    assert set(conv3d.PRESETS) == set(triplane_transformer.PRESETS) == set(config.GENERATOR_PRESETS)
    assert REPRESENTATIONS == config.PER_PROMPT and set(PRESETS) == set(config.PER_PROMPT)
    assert typing.get_args(typing.get_type_hints(config.DistillConfig)["name"]) == config.DISTILLERS
    for name in config.DISTILLERS:  # every listed distiller is built (none falls through build_distiller)
        d = build_distiller(load_config(None, [f"distill.name={name}"]), LinearPrior())
        assert type(d).__name__.lower() == name


# --- what docs/architecture.md promises about the interfaces ------------------------------------------------------


def test_a_prior_has_four_required_methods_as_its_docstring_and_architecture_md_say():
    from scalegen.priors import base

    required = {n for n, f in vars(base.Prior).items() if inspect.isfunction(f)
                and "raise NotImplementedError" in inspect.getsource(f)}
    assert required == {"encode", "decode", "text_embeddings", "predict_eps"}
    assert "two attributes and four required methods" in " ".join(base.__doc__.split())
    assert all(f"``{n}(" in base.__doc__ for n in required)
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    assert "two required attributes and four required methods" in " ".join(doc.split())


def test_the_callers_of_the_interfaces_do_not_ask_which_class_they_hold():
    """docs/architecture.md: the loop, SceneModel, the distillers, oracle evaluation and CLIP scoring contain no
    isinstance / hasattr / getattr / inspect on a collaborator."""
    files = [PACKAGE / "train" / "loop.py", PACKAGE / "train" / "model.py", PACKAGE / "eval" / "oracle.py",
             *(PACKAGE / "distill").glob("*.py")]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "hasattr", "getattr"):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, (ast.Import, ast.ImportFrom)) and "inspect" in ast.unparse(node):
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports inspect")
    assert not found, "\n".join(found)
