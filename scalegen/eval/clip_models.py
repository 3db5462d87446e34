"""CLIP image/text towers for evaluation, behind one small interface, from two libraries.

``--model`` takes (``load_clip``):
  * a local transformers CLIP folder (``config.json`` with ``model_type: clip``, tokenizer files;
    what ``huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`` writes), or a hub
    id such as ``openai/clip-vit-large-patch14``: loaded with transformers' ``CLIPModel``, as
    ScaleDreamer's ``evaluation/CLIP/evaluation_amortized.py`` does (its ``CLIPTextModelWithProjection``
    / ``CLIPVisionModelWithProjection`` are the same towers and projections);
  * an open_clip ``NAME:PRETRAINED`` pair (``ViT-B-32:openai``; PRETRAINED may be a tag or a
    checkpoint file), an open_clip folder (``open_clip_config.json`` + weights), or ``hf-hub:org/repo``.
    The OpenAI tags load the same weights as OpenAI's ``clip`` package (TriplaneTurbo's
    ``evaluation/clipscore/compute.py``).

Features are L2-normalised float32. ``model_id`` names the weights for the text-feature cache:
the spec itself for hub ids and tags (a release names fixed weights), else the spec plus the
size and mtime of the weight files, so a re-saved local model never reuses stale features.

``make_tiny_clip_model`` writes randomly initialised CLIPs in both layouts (with CLIP's real
tokenizer vocabulary) so tests and smoke runs load them through exactly the code real weights take.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch
from torch import Tensor

from scalegen import atomic
from scalegen.errors import WeightsError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def default_cache_dir() -> Path:
    """Where text features are cached: $SCALEGEN_CACHE, else $XDG_CACHE_HOME/scalegen, else ~/.cache/scalegen."""
    root = os.environ.get("SCALEGEN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalegen"
    return Path(root) / "clip-text"


def _files_fingerprint(files: list[Path]) -> str:
    h = hashlib.sha1()
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


class ClipModel:
    """A CLIP: ``encode_text(list[str])`` and ``encode_images(pixels [N, 3, S, S] normalised)``, both
    -> [N, D] unit vectors. ``image_size`` = S; ``mean``/``std`` the pixel normalisation."""

    backend = ""

    def __init__(self, spec: str, model_id: str, image_size: int, mean, std, device):
        self.spec, self.model_id, self.image_size = spec, model_id, int(image_size)
        self.mean, self.std = tuple(float(x) for x in mean), tuple(float(x) for x in std)
        self.device = torch.device(device)

    def encode_text(self, texts: list[str]) -> Tensor:
        raise NotImplementedError

    def encode_images(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError


class TransformersClip(ClipModel):
    """A transformers ``CLIPModel`` and its tokenizer (``load_transformers_clip`` loads one)."""

    backend = "transformers"

    def __init__(self, model, tokenizer, spec: str, model_id: str, mean=OPENAI_MEAN, std=OPENAI_STD, device="cpu"):
        self.model, self.tokenizer = model.to(device).eval().requires_grad_(False), tokenizer
        self.max_tokens = model.config.text_config.max_position_embeddings
        super().__init__(spec, model_id, model.config.vision_config.image_size, mean, std, device)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        feats = self.model.text_projection(self.model.text_model(input_ids=ids).pooler_output)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        dtype = self.model.visual_projection.weight.dtype
        feats = self.model.visual_projection(self.model.vision_model(pixel_values=pixels.to(self.device, dtype)).pooler_output)
        return torch.nn.functional.normalize(feats.float(), dim=-1)


def load_transformers_clip(spec: str, device="cpu") -> TransformersClip:
    local = Path(spec).is_dir()
    if local:
        cfg_path = Path(spec) / "config.json"
        kind = json.loads(cfg_path.read_text()).get("model_type") if cfg_path.is_file() else None
        if kind != "clip":
            raise WeightsError(f"'{spec}' is not a transformers CLIP folder (config.json model_type is {kind!r}, "
                               "expected 'clip'); give a folder saved by CLIPModel.save_pretrained or a hub download")
    path = spec if local else hub_snapshot(spec, "config.json")  # the cache, never the network
    if path is None:
        raise WeightsError(f"the CLIP '{spec}' is neither a local folder nor in the local Hugging Face cache "
                           f"({hub_cache_dir()}); on a machine with network access run `{download_command(spec)}` "
                           f"(then --model {spec} finds it in the cache; copy the cache folder over if that is another "
                           f"machine) or `{download_command(spec, local_dir=True)}` and pass --model /models/{_tail(spec)}")
    from transformers import AutoTokenizer, CLIPModel  # noqa: PLC0415 - optional extra, imported once files are found

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise _missing_hf(spec, e) from None
    mean, std = OPENAI_MEAN, OPENAI_STD
    pre = Path(spec) / "preprocessor_config.json"
    if local and pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = p.get("image_mean", mean), p.get("image_std", std)
    if local:
        model_id = f"transformers:{Path(spec).resolve()}:" + _files_fingerprint(
            [f for f in Path(spec).iterdir() if f.suffix in WEIGHT_SUFFIXES])
    else:
        model_id = f"transformers:{spec}"
    return TransformersClip(model, tokenizer, spec, model_id, mean, std, device)


def _tail(spec: str) -> str:
    return spec.rstrip("/").split("/")[-1]


def _missing_hf(spec: str, err: Exception) -> WeightsError:
    """The files are there (a folder or a cached snapshot) but do not load."""
    return WeightsError(f"cannot load the CLIP '{spec}': its files are there but incomplete or unreadable "
                        f"({err.__class__.__name__}); download it again with `{download_command(spec, local_dir=True)}` "
                        f"and pass --model /models/{_tail(spec)}")


def hub_cache_dir() -> str:
    """The Hugging Face hub cache this process reads ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):  # read now, not at huggingface_hub's import
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]) / "hub")
    from huggingface_hub import constants  # noqa: PLC0415

    return constants.HF_HUB_CACHE


def download_command(repo: str, filename: str | None = None, local_dir: bool = False) -> str:
    """The command that fetches ``repo`` (or one file of it) on a machine with network access."""
    return (f"huggingface-cli download {repo}" + (f" {filename}" if filename else "")
            + (f" --local-dir /models/{_tail(repo)}" if local_dir else ""))


def hub_file(repo: str, filename: str) -> str | None:
    """The cached path of ``filename`` of hub repo ``repo``, or None: the cache is read, the network never."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    try:
        path = try_to_load_from_cache(repo, filename, cache_dir=hub_cache_dir())
    except Exception:  # noqa: BLE001 - an invalid repo id is not cached either
        return None
    return path if isinstance(path, str) and Path(path).is_file() else None


def hub_snapshot(repo: str, needed: str) -> str | None:
    """The cached snapshot folder of ``repo`` holding ``needed``, or None (no network call)."""
    path = hub_file(repo, needed)
    return str(Path(path).parent) if path else None


class OpenClip(ClipModel):
    """An open_clip ``CLIP`` and its tokenizer (``load_open_clip`` loads one)."""

    backend = "open_clip"

    def __init__(self, model, tokenizer, spec: str, model_id: str, device="cpu"):
        self.model, self.tokenizer = model.to(device).eval().requires_grad_(False), tokenizer
        pre = model.visual.preprocess_cfg
        super().__init__(spec, model_id, model.visual.image_size[0], pre["mean"], pre["std"], device)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> Tensor:
        return torch.nn.functional.normalize(self.model.encode_text(self.tokenizer(texts).to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, pixels: Tensor) -> Tensor:
        return torch.nn.functional.normalize(self.model.encode_image(pixels.to(self.device)).float(), dim=-1)


def load_open_clip(spec: str, device="cpu") -> OpenClip:
    import open_clip  # noqa: PLC0415 - optional extra

    name, pretrained, files = _parse_open_clip(spec)
    kw = {}
    if name.startswith("hf-hub:"):  # config and weights of a hub repo: a cached snapshot, loaded as a folder
        name = "local-dir:" + _cached_open_clip_repo(spec, name[len("hf-hub:"):])
    elif pretrained and not files:  # a tag: its weights file from the cache, with the tag's settings
        pretrained, kw = _cached_open_clip_tag(spec, name, pretrained)
    quiet = logging.root.manager.disable
    logging.disable(logging.ERROR)  # open_clip logs a failed load itself; our error says it once
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device, **kw)
        tokenizer = open_clip.get_tokenizer(name)
    except RuntimeError as e:
        if "not found in built-ins" in str(e):
            raise WeightsError(f"open_clip has no model '{name}' (from --model {spec}); use a name from "
                               "open_clip.list_models(), e.g. ViT-B-32:openai or ViT-L-14:openai") from None
        raise _missing_open_clip(spec, name, pretrained, e) from None
    except (OSError, ValueError) as e:
        raise _missing_open_clip(spec, name, pretrained, e) from None
    finally:
        logging.disable(quiet)
    model_id = f"open_clip:{spec}" + (":" + _files_fingerprint(files) if files else "")
    return OpenClip(model, tokenizer, spec, model_id, device)


def random_open_clip(name: str, device="cpu") -> OpenClip:
    """open_clip architecture ``name`` with random weights: the real model's cost, no download
    (benchmarks; its scores mean nothing)."""
    import open_clip  # noqa: PLC0415

    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "no pretrained weights loaded": that is the point here
    try:
        model = open_clip.create_model(name, pretrained=None, device=device)
    finally:
        logging.disable(quiet)
    return OpenClip(model, open_clip.get_tokenizer(name), f"{name}:random", f"random:{name}:{time.time_ns()}", device)


def _parse_open_clip(spec: str) -> tuple[str, str | None, list[Path]]:
    """(model name, pretrained tag/file or None, local weight files) of an open_clip spec."""
    p = Path(spec)
    if p.is_dir():
        return f"local-dir:{p}", None, [f for f in p.iterdir() if f.suffix in WEIGHT_SUFFIXES]
    if spec.startswith(("hf-hub:", "local-dir:")):
        if spec.startswith("local-dir:"):
            d = Path(spec[len("local-dir:"):])
            return spec, None, [f for f in d.iterdir() if f.suffix in WEIGHT_SUFFIXES] if d.is_dir() else []
        return spec, None, []
    name, _, pretrained = spec.partition(":")
    if not pretrained:
        raise WeightsError(f"--model {spec}: an open_clip model needs NAME:PRETRAINED (e.g. ViT-B-32:openai or "
                           "ViT-B-32-quickgelu:/path/open_clip_pytorch_model.bin)")
    files = [Path(pretrained)] if Path(pretrained).is_file() else []
    if not files and ("/" in pretrained or Path(pretrained).suffix in WEIGHT_SUFFIXES):
        raise WeightsError(f"open_clip checkpoint '{pretrained}' does not exist; give an existing file or a tag such "
                           "as openai")
    return name, pretrained, files


OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # open_clip's names, preferred first


def _cached_open_clip_repo(spec: str, repo: str) -> str:
    """The cached snapshot folder of an open_clip hub repo (config + weights), or a WeightsError saying
    what to download: checked in the cache before open_clip could try the network."""
    folder = hub_snapshot(repo, "open_clip_config.json")
    if folder is None or not any((Path(folder) / w).is_file() for w in OPEN_CLIP_WEIGHTS):
        raise WeightsError(f"--model {spec}: the open_clip model {repo} is not in the local Hugging Face cache "
                           f"({hub_cache_dir()}); on a machine with network access run `{download_command(repo)}` "
                           f"(then --model {spec} finds it in the cache; copy the cache folder over if that is another "
                           f"machine) or `{download_command(repo, local_dir=True)}` and pass --model /models/{_tail(repo)}")
    return folder


def _cached_open_clip_tag(spec: str, name: str, tag: str) -> tuple[str, dict]:
    """(cached weights file, create_model keywords) of an open_clip NAME:TAG, or a WeightsError with the
    download command. The tag's settings (QuickGELU, preprocessing) are passed as open_clip would."""
    import open_clip  # noqa: PLC0415

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise WeightsError(f"open_clip has no weights '{tag}' for {name} (from --model {spec}); its tags are "
                           f"{', '.join(tags) or 'none'}")
    kw = {"force_quick_gelu": bool(cfg.get("quick_gelu")),
          "force_preprocess_cfg": {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}}
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = os.path.split(hub.rstrip("/") if hub.endswith("/") else hub)
        if hub.endswith("/"):
            repo, filename = hub.rstrip("/"), ""
        names = [filename] if filename else list(OPEN_CLIP_WEIGHTS)
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        for n in names:
            path = hub_file(repo, n)
            if path:
                return path, kw
        want = filename or OPEN_CLIP_WEIGHTS[1]
        arch = f"{name}-quickgelu" if cfg.get("quick_gelu") else name
        raise WeightsError(f"--model {spec}: the weights ({repo}, {want}) are not in the local Hugging Face cache "
                           f"({hub_cache_dir()}); on a machine with network access run `{download_command(repo, want)}` "
                           f"(then --model {spec} finds them in the cache; copy the cache folder over if that is "
                           f"another machine) or pass --model {arch}:/path/to/{want}")
    url = cfg.get("url", "")
    path = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if url and path.is_file():
        return str(path), kw
    raise WeightsError(f"--model {spec}: the weights are not downloaded; on a machine with network access fetch {url} "
                       f"into ~/.cache/clip/ (or pass --model {name}:/path/to/{os.path.basename(url) or 'weights.pt'})")


def _missing_open_clip(spec: str, name: str, pretrained: str | None, err: Exception) -> WeightsError:
    """Local files that open_clip could not load (the cache was checked before)."""
    return WeightsError(f"cannot load open_clip {spec} ({err.__class__.__name__}: {' '.join(str(err).split())}); check "
                        "the name, the tag and that the checkpoint file matches the architecture")


def load_clip(spec: str, device="cpu") -> ClipModel:
    """The CLIP named by ``spec`` (see the module docstring for the accepted forms)."""
    p = Path(spec)
    if p.is_dir():
        if (p / "open_clip_config.json").is_file():
            return load_open_clip(spec, device)
        if (p / "config.json").is_file():
            return load_transformers_clip(spec, device)
        raise WeightsError(f"'{spec}' holds neither a transformers CLIP (config.json) nor an open_clip model "
                           "(open_clip_config.json)")
    if ":" in spec:
        return load_open_clip(spec, device)
    if "/" in spec and not p.exists() and not spec.startswith((".", "/")):
        return load_transformers_clip(spec, device)
    raise WeightsError(f"--model '{spec}' is neither a folder, an open_clip NAME:PRETRAINED pair nor a hub id; "
                       "e.g. openai/clip-vit-large-patch14, ViT-B-32:openai or a local CLIP folder")


# ---------------------------------------------------------------------------------------------
class TextFeatureCache:
    """Text features on disk, keyed by (model id, text): ``DIR/<sha1(model id)>/part-*.safetensors``,
    each with its texts' keys in the metadata. Parts are written under a temporary name and renamed,
    so an interrupted write never leaves a half part; concurrent writers never share a file."""

    def __init__(self, root: str | Path, model: ClipModel):
        self.model = model
        self.dir = Path(root) / hashlib.sha1(model.model_id.encode()).hexdigest()[:16]

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode()).hexdigest()

    def _load(self) -> dict[str, Tensor]:
        from safetensors import safe_open  # noqa: PLC0415

        found: dict[str, Tensor] = {}
        for part in sorted(self.dir.glob("part-*.safetensors")):
            with safe_open(str(part), "pt") as f:
                keys = json.loads(f.metadata()["keys"])
                feats = f.get_tensor("features")
            found.update(zip(keys, feats))
        return found

    def features(self, texts: list[str], batch_size: int = 256, write: bool = True, progress: bool = False) -> Tensor:
        """[len(texts), D] features; missing ones are encoded (in batches) and stored when ``write``."""
        from safetensors.torch import save_file  # noqa: PLC0415
        from tqdm import tqdm  # noqa: PLC0415

        found = self._load()
        keys = [self.key(t) for t in texts]
        todo = sorted({k: t for k, t in zip(keys, texts) if k not in found}.items())
        if todo and write:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "model_id.txt").write_text(self.model.model_id + "\n")
        chunk = 8192  # texts per part file
        bar = tqdm(total=len(todo), desc="text features", unit="prompt", disable=not progress or not todo)
        for s in range(0, len(todo), chunk):
            part = todo[s:s + chunk]
            encoded = []
            for b in range(0, len(part), batch_size):
                encoded.append(self.model.encode_text([t for _, t in part[b:b + batch_size]]).cpu())
                bar.update(len(encoded[-1]))
            feats = torch.cat(encoded)
            found.update(zip([k for k, _ in part], feats))
            if write:
                name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:8]}.safetensors"
                with atomic.writing(self.dir / name) as tmp:
                    save_file({"features": feats.contiguous()}, str(tmp),
                              metadata={"keys": json.dumps([k for k, _ in part])})
        bar.close()
        return torch.stack([found[k] for k in keys]) if keys else torch.zeros(0)


# ---------------------------------------------------------------------------------------------
def make_tiny_clip_model(out_dir: str | Path, backend: str = "transformers", width: int = 32, layers: int = 2,
                         image_size: int = 32, patch_size: int = 8, embed_dim: int = 16, seed: int = 0) -> Path:
    """Write a randomly initialised CLIP (both towers) in ``backend``'s layout; returns the folder."""
    from scalegen.text.clip import clip_bpe_vocab  # noqa: PLC0415 - CLIP's real BPE vocabulary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vocab, merges = clip_bpe_vocab()
    if backend == "transformers":
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel  # noqa: PLC0415

        from scalegen.text.clip import save_clip_tokenizer  # noqa: PLC0415

        tok, _ = save_clip_tokenizer(out, pad_token="<|endoftext|>")
        cfg = CLIPConfig(
            text_config=dict(vocab_size=len(vocab), hidden_size=width, intermediate_size=4 * width,
                             num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                             bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                             pad_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu"),
            vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                               num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                               hidden_act="quick_gelu"),
            projection_dim=embed_dim)
        CLIPModel(cfg).save_pretrained(out)
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                           image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD)).save_pretrained(out)
    elif backend == "open_clip":
        from open_clip.model import CLIP  # noqa: PLC0415
        from safetensors.torch import save_file  # noqa: PLC0415

        model_cfg = {"embed_dim": embed_dim, "quick_gelu": True,
                     "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                                    "patch_size": patch_size, "head_width": width // 2},
                     "text_cfg": {"context_length": 77, "vocab_size": len(vocab), "width": width,
                                  "heads": 2, "layers": layers}}
        (out / "open_clip_config.json").write_text(json.dumps({
            "model_cfg": model_cfg,
            "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                               "resize_mode": "shortest"}}, indent=1))
        model = CLIP(**model_cfg)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "open_clip_model.safetensors"))
    else:
        raise WeightsError(f"unknown CLIP backend '{backend}'; choose transformers or open_clip")
    return out
