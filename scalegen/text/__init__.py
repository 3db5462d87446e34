"""Text encoders: frozen maps from prompts to conditions for the generators.

``build_text_encoder(cfg)`` maps ``text.encoder`` to a constructor; every encoder returns a
``TextCond`` and carries an ``id`` (recorded in shard manifests and checkpoints).
"""
from __future__ import annotations

from scalegen.text.base import TextCond, TextEncoder
from scalegen.text.bow import BagOfWordsEncoder


def build_text_encoder(cfg) -> TextEncoder:
    """``cfg`` is the whole ``Config``."""
    t = cfg.text
    if t.encoder == "bow":
        return BagOfWordsEncoder(dim=t.dim, max_tokens=t.max_tokens, word_order=t.word_order)
    if t.encoder == "clip":
        import torch  # noqa: PLC0415

        from scalegen.text.clip import CLIPTextEncoder  # noqa: PLC0415 - needs the [sd] extra

        return CLIPTextEncoder(cfg.text_model(), device="cuda" if torch.cuda.is_available() else "cpu",
                               key="text.model" if t.model else "prior.model")  # the key that named it
    raise AssertionError(f"unhandled text encoder {t.encoder}")  # config validation prevents this


def text_dim_of(cfg) -> int:
    """Embedding width of ``cfg``'s text encoder without loading it: ``text.dim`` for bag-of-words;
    for CLIP the ``hidden_size`` of a local diffusers folder's text_encoder, else 1024 (SD 2.1's
    OpenCLIP ViT-H, ScaleDreamer's c_dim)."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    if cfg.text.encoder == "bow":
        return cfg.text.dim
    conf = Path(cfg.text_model()) / "text_encoder" / "config.json"
    if conf.is_file():
        return int(json.loads(conf.read_text()).get("hidden_size", 1024))
    return 1024


__all__ = ["text_dim_of", "TextCond", "TextEncoder", "BagOfWordsEncoder", "build_text_encoder"]
