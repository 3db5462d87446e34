"""A generator as one folder in the Hugging Face layout, and back.

    DIR/config.json          the run's whole resolved config, the text encoder it needs, the prompt
                             format, the weights' sha256
    DIR/model.safetensors    generator + background (no optimizer, no prior)
    DIR/README.md            the model card: front matter (library_name, tags, license, pipeline_tag),
                             training corpus, distiller, prior, steps, evaluation numbers with their
                             command, a sample gallery, how to load it
    DIR/gallery.png          sample renders (the card shows it)

``load_pretrained`` reads such a folder, a run folder, a checkpoint folder, or a Hub id from the
local Hugging Face cache (resolved with huggingface_hub, never downloaded here).
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from scalegen import __version__
from scalegen.atomic import staged_folder
from scalegen.config import from_dict
from scalegen.errors import CheckpointError, WeightsError
from scalegen.train.checkpoint import file_sha256

CONFIG, WEIGHTS, CARD, GALLERY = "config.json", "model.safetensors", "README.md", "gallery.png"
FORMAT = "scalegen-pretrained/1"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_pretrained_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() and (path / WEIGHTS).is_file() and not (path / "config.yaml").is_file()


def resolve_hub_id(repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache (``HF_HUB_CACHE``); nothing is
    downloaded: a missing one fails at once with the command that fetches it."""
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        return Path(snapshot_download(repo_id, local_files_only=True, allow_patterns=[CONFIG, WEIGHTS, CARD, GALLERY]))
    except ImportError:
        raise WeightsError(f"'{repo_id}' looks like a Hub id, and loading one needs huggingface_hub: "
                           "pip install huggingface_hub") from None
    except Exception:  # noqa: BLE001 - not cached, not a valid id: the same to a user
        raise WeightsError(f"'{repo_id}' is neither a folder here nor in the local Hugging Face cache; on a machine "
                           f"with network access run `huggingface-cli download {repo_id}` (then copy its cache "
                           "folder here, or pass the downloaded folder)") from None


def load_pretrained(name_or_path: str | Path):
    """(cfg, text encoder, SceneModel in eval mode, source) of a run, checkpoint, exported folder or Hub id."""
    from scalegen.train.model import build_model, load_run  # noqa: PLC0415 - keeps `import scalegen` light

    path = Path(name_or_path)
    if not path.exists():
        if not HUB_ID.match(str(name_or_path)):
            raise CheckpointError(f"'{name_or_path}' does not exist; pass a run folder, a folder written by "
                                  "`scalegen export-pretrained`, or a Hub id (owner/name)")
        path = resolve_hub_id(str(name_or_path))
    if not is_pretrained_folder(path):
        cfg, text_encoder, model, ckpt = load_run(path)
        return cfg, text_encoder, model, str(ckpt)
    try:
        meta = json.loads((path / CONFIG).read_text())
        cfg = from_dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"'{path / CONFIG}' is not a scalegen config.json ({e.__class__.__name__}: {e}); "
                              "export the folder again with `scalegen export-pretrained`") from None
    expected = meta.get("sha256", {}).get(WEIGHTS)
    if expected is not None and file_sha256(path / WEIGHTS) != expected:
        raise CheckpointError(f"'{path / WEIGHTS}' does not match the sha256 in {CONFIG} (the file was changed or "
                              "damaged); download or export it again")
    text_encoder, model = build_model(cfg)
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        state = load_file(str(path / WEIGHTS))
    except Exception as e:  # noqa: BLE001 - any parse failure is the same user problem
        raise CheckpointError(f"'{path / WEIGHTS}' has unreadable weights ({e.__class__.__name__}); download or "
                              "export it again") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"'{path / WEIGHTS}' does not match its {CONFIG} (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]})")
    return cfg, text_encoder, model.eval(), str(path)


def world_of(cfg):
    """The oracle world a config was trained in (its ground truth's), or None for a learned prior."""
    from scalegen.priors import build_ground_truth  # noqa: PLC0415

    truth = build_ground_truth(cfg)
    return truth.world if truth is not None else None


def prompt_format(cfg, world) -> str:
    """What the prompts must look like, for config.json and the card (``world``: ``world_of(cfg)``)."""
    if cfg.data.prompt is not None:
        return f"only its own prompt: {cfg.data.prompt!r} (a per-prompt scene)"
    if world is not None:
        if cfg.world.kind == "single":
            return "the oracle world's grammar: 'a <size> <color> <shape>', e.g. 'a small blue torus'"
        return "the compositional oracle world's grammar (see `scalegen data compose`)"
    return "free English text, as the training corpus"


def text_encoder_info(cfg) -> dict:
    if cfg.text.encoder == "bow":
        return {"kind": "bow", "model": None, "dim": cfg.text.dim,
                "note": "offline bag-of-words encoder, built from this config (no weights)"}
    return {"kind": "clip", "model": cfg.text_model(),
            "note": "a CLIP text tower in diffusers layout (tokenizer/, text_encoder/), loaded from this id or folder"}


def sample_prompts(cfg, world, n: int = 4) -> list[str]:
    """Prompts for the card's gallery: the per-prompt scene's own, else the world's (``world_of(cfg)``)
    seen and unseen ones, else the corpus's first ones."""
    if cfg.data.prompt is not None:
        return [cfg.data.prompt]
    if world is not None:
        splits = list(world.splits().values())
        per = max(1, n // len(splits))
        return [p for ps in splits for p in ps[:per]][:n]
    try:
        from scalegen.data.prompts import read_corpus  # noqa: PLC0415

        return read_corpus(cfg.data.prompts, split=cfg.data.split)[:n]
    except Exception:  # noqa: BLE001 - the corpus need not travel with the weights
        return []


def gallery_png(pipe, prompts: list[str], path: Path, views: int = 4, size: int = 128) -> Path | None:
    """A grid of ``views`` renders (one row per prompt) written to ``path``."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    if not prompts:
        return None
    field, background = pipe.fields(prompts)
    frames = pipe.render(field, background, views, size)  # [B, V, H, W, 3]
    grid = np.concatenate([np.concatenate(list(row), 1) for row in frames], 0)
    Image.fromarray(grid).save(path)
    return path


def _metrics_table(results: dict) -> str:
    rows = []
    for split, r in results.items():
        if isinstance(r, dict) and "psnr" in r:
            r_at_1 = r.get("r_at_1")
            rows.append(f"| {split} | {r['psnr']:.3f} | {r.get('iou', float('nan')):.3f} | "
                        f"{'-' if r_at_1 is None else f'{r_at_1:.3f}'} | {r.get('n_prompts', '-')} |")
    if not rows:
        return ""
    return "| split | PSNR (dB) | mask IoU | R@1 | prompts |\n| --- | ---: | ---: | ---: | ---: |\n" + "\n".join(rows)


def model_card(cfg, world, meta: dict, eval_results: dict | None, eval_command: str | None, has_gallery: bool,
               repo_id: str | None = None) -> str:
    """README.md: Hugging Face front matter (parsed by huggingface_hub's ModelCard) and the card's text."""
    from huggingface_hub import ModelCardData  # noqa: PLC0415

    tags = ["text-to-3d", "score-distillation", cfg.distill.name, cfg.generator.name, f"prior-{cfg.prior.name}"]
    data = ModelCardData(library_name="scalegen", license="apache-2.0", pipeline_tag="text-to-3d", tags=tags)
    corpus = meta["training"]["corpus"]
    load_id = repo_id or "PATH_TO_THIS_FOLDER"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {cfg.generator.name} trained with {cfg.distill.name.upper()} (scalegen)", "",
        "An amortized text-to-3D generator: one forward pass turns a prompt into a 3D field, exported as a mesh.",
        f"Trained with scalegen {__version__} (`pip install scalegen`) by score distillation, without any 3D data.",
        "",
        "## Training", "",
        f"- generator: `{cfg.generator.name}`",
        f"- distiller: `{cfg.distill.name}` (CFG {cfg.distill.guidance_scale})",
        f"- prior: `{cfg.prior.name}`" + (f" (`{cfg.prior.model}`)" if world is None else
                                          " (the exact oracle prior of scalegen's embedded world)"),
        f"- text encoder: `{meta['text_encoder']['kind']}`"
        + (f" (`{meta['text_encoder']['model']}`)" if meta["text_encoder"]["model"] else ""),
        f"- training corpus: {corpus['name']} ({corpus['size']} prompts)",
        f"- steps: {meta['training']['steps']}",
        f"- prompts: {meta['prompts']}", "",
    ]
    table = _metrics_table(eval_results or {})
    lines += ["## Evaluation", ""]
    if table:
        lines += [table, "", f"Command: `{eval_command}`" if eval_command else "", ""]
    else:
        lines += ["No evaluation numbers were recorded for this export.", ""]
    if has_gallery:
        lines += ["## Samples", "", f"![samples]({GALLERY})", "",
                  "Rows: " + "; ".join(f"'{p}'" for p in meta.get("gallery_prompts", [])), ""]
    lines += ["## Use", "", "```python", "from scalegen import TextTo3DPipeline", "",
              f'pipe = TextTo3DPipeline.from_pretrained("{load_id}")',
              f'pipe(["{(meta.get("gallery_prompts") or ["a small blue torus"])[0]}"])[0].save("asset.glb")', "```", "",
              f"or `scalegen generate --ckpt {load_id} --prompt '...' --out asset.glb`.", ""]
    return "\n".join(lines)


def corpus_info(cfg, world) -> dict:
    if cfg.data.prompt is not None:
        return {"name": "a single prompt", "size": 1}
    if world is not None:
        return {"name": f"oracle world ({cfg.world.kind}), seen split", "size": len(world.splits()["seen"])}
    name = cfg.data.shards or cfg.data.prompts
    try:
        from scalegen.data.prompts import read_corpus  # noqa: PLC0415

        return {"name": str(name), "size": len(read_corpus(cfg.data.prompts, split=cfg.data.split))}
    except Exception:  # noqa: BLE001 - the corpus need not be on the exporting machine
        return {"name": str(name), "size": "unknown"}


def save_pretrained(pipe, out: str | Path, eval_results: dict | None = None, eval_command: str | None = None,
                    gallery: bool = True, steps: int | None = None, repo_id: str | None = None) -> Path:
    """Write ``pipe`` to the folder ``out`` (new, or empty), built in a staging folder and moved into place."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"'{out}' already exists and is not an empty folder; give a new folder")
    if not (out.parent if str(out.parent) else Path(".")).is_dir():
        raise CheckpointError(f"folder '{out.parent}' does not exist; create it first")
    cfg, world = pipe.cfg, pipe.world  # the world is built once, here, for every part of the card
    state = {k: v.detach().contiguous().cpu() for k, v in pipe.model.state_dict().items()}
    prompts = sample_prompts(cfg, world) if gallery else []
    meta = {"format": FORMAT, "scalegen_version": __version__, "config": cfg.to_dict(),
            "text_encoder": text_encoder_info(cfg), "prompts": prompt_format(cfg, world),
            "training": {"corpus": corpus_info(cfg, world), "steps": steps, "source": pipe.source},
            "gallery_prompts": prompts}
    if eval_results is not None:
        meta["eval"] = {"results": eval_results, "command": eval_command}
    with staged_folder(out) as stage:
        save_file(state, str(stage / WEIGHTS), metadata={"format": "pt", "library": "scalegen"})
        meta["sha256"] = {WEIGHTS: file_sha256(stage / WEIGHTS)}
        has_gallery = gallery_png(pipe, prompts, stage / GALLERY) is not None
        (stage / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        (stage / CARD).write_text(model_card(cfg, world, meta, eval_results, eval_command, has_gallery, repo_id))
    return out


def push_to_hub(pipe, repo_id: str, folder: str | Path | None = None, private: bool = False, **card) -> str:
    """``save_pretrained`` then upload with huggingface_hub (a token and network are needed)."""
    from huggingface_hub import HfApi  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        target = Path(folder) if folder is not None else Path(tmp) / "export"
        save_pretrained(pipe, target, repo_id=repo_id, **card)
        api = HfApi()
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(target))
    return str(url)


