"""The trainable 3D part of a run (generator + background) and how to rebuild it from a
checkpoint. Everything a checkpoint's ``model.safetensors`` holds lives in ``SceneModel``."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scalegen.config import Config, from_dict, load_yaml
from scalegen.errors import CheckpointError
from scalegen.generators import Generator, build_generator
from scalegen.render import Background, build_background
from scalegen.text import TextCond, build_text_encoder
from scalegen.train.checkpoint import load_weights, resolve_checkpoint, run_dir_of, shape_mismatch


class SceneModel(nn.Module):
    def __init__(self, generator: Generator, background: Background):
        super().__init__()
        self.generator, self.background = generator, background

    def forward(self, cond: TextCond):
        """(field, background) of a batch of prompts. Called through the (possibly DDP-wrapped)
        module so distributed gradient sync sees a forward pass."""
        return self.generator(cond), self.background.bind(cond)


def build_scene(cfg: Config, text_dim: int) -> SceneModel:
    """A SceneModel for text embeddings of width ``text_dim`` (no text encoder loaded)."""
    return SceneModel(build_generator(cfg, text_dim), build_background(cfg, text_dim))


def build_model(cfg: Config):
    """(text encoder, SceneModel) freshly initialised from ``cfg``."""
    text_encoder = build_text_encoder(cfg)
    return text_encoder, build_scene(cfg, text_encoder.dim)


def load_run(path: str | Path):
    """(cfg, text encoder, model in eval mode, checkpoint path) from a run dir or checkpoint."""
    ckpt = resolve_checkpoint(path)
    cfg_path = run_dir_of(ckpt) / "config.yaml"
    if not cfg_path.is_file():
        raise CheckpointError(f"'{cfg_path}' is missing; a run directory needs the config.yaml that "
                              "`scalegen train` writes")
    cfg = from_dict(load_yaml(cfg_path))
    text_encoder, model = build_model(cfg)
    state = {k[len("model."):]: v for k, v in load_weights(ckpt).items() if k.startswith("model.")}
    built = model.state_dict()
    try:  # a model whose size changes in training (a Gaussian scene) resizes itself in load_state_dict
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError:
        bad = shape_mismatch(built, state)
        if bad is None:
            raise
        raise CheckpointError(f"checkpoint '{ckpt}' does not match its config: {bad[0]} has shape {bad[1]} in the "
                              f"weights but {bad[2]} from config.yaml; was config.yaml edited?") from None
    if missing or unexpected:
        raise CheckpointError(f"checkpoint '{ckpt}' does not match its config (missing {list(missing)[:3]}, "
                              f"unexpected {list(unexpected)[:3]}); was config.yaml edited?")
    return cfg, text_encoder, model.eval(), ckpt


@torch.no_grad()
def field_for(model: SceneModel, text_encoder, prompts: list[str]):
    """Fields and backgrounds of ``prompts`` (inference)."""
    cond = text_encoder.encode(prompts)
    return model(cond)
