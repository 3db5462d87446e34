"""Stable Diffusion's CLIP text tower as a ``TextEncoder``.

Loads ``tokenizer/`` and ``text_encoder/`` from a diffusers folder or hub id (the layout of
``stabilityai/stable-diffusion-2-1-base``). Like ScaleDreamer's prompt processor it returns both
the per-token ("local") embeddings ``last_hidden_state`` [B, 77, D] and the pooled ("global")
``pooler_output`` [B, D] (the final-layer-normed EOS token). The mask is all True: SD's UNet
attends to all 77 positions, padding included.

``make_tiny_clip`` writes a randomly initialised CLIP text tower in the same layout, with the real
CLIP BPE vocabulary that open_clip ships, so tests and CPU smoke runs load it through exactly the
code path real weights take.
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

from scalegen.errors import WeightsError
from scalegen.text.base import TextCond, TextEncoder


def hf_offline() -> bool:
    """HF offline mode, read now (huggingface_hub reads it once, at import time)."""
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _load_error(model: str, what: str, err: Exception) -> WeightsError:
    offline = hf_offline()
    where = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading"
             if offline else "it could not be loaded or downloaded")
    return WeightsError(f"cannot load the CLIP {what} from '{model}' ({where}); put a diffusers folder with "
                        f"tokenizer/ and text_encoder/ there, or download the id, e.g. `huggingface-cli download "
                        f"stabilityai/stable-diffusion-2-1-base` ({err.__class__.__name__})")


class CLIPTextEncoder(TextEncoder):
    def __init__(self, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415 - optional extra

        local = Path(model).is_dir()
        if local and not (Path(model) / "text_encoder").is_dir():
            raise WeightsError(f"'{model}' has no text_encoder/ folder; point text.model at a diffusers "
                               "Stable Diffusion folder (with tokenizer/ and text_encoder/)")
        offline = hf_offline() or local
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", local_files_only=offline)
        except Exception as e:  # noqa: BLE001 - many loader exceptions mean the same to a user
            raise _load_error(model, "tokenizer", e) from None
        try:
            self.model = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", torch_dtype=dtype,
                                                       local_files_only=offline)
        except Exception as e:  # noqa: BLE001
            raise _load_error(model, "text encoder", e) from None
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dim = self.model.config.hidden_size
        self.max_tokens = self.tokenizer.model_max_length
        cfg = self.model.config
        self.id = f"clip:{Path(model).name if local else model}:h{cfg.hidden_size}-l{cfg.num_hidden_layers}"

    def count_tokens(self, prompt: str) -> int:
        """Tokens including start/end markers (> max_tokens means the prompt gets truncated)."""
        return len(self.tokenizer(prompt, truncation=False)["input_ids"])

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> TextCond:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt").input_ids.to(self.device)
        out = self.model(ids)
        tokens, pooled = out.last_hidden_state.float(), out.pooler_output.float()
        return TextCond(pooled=pooled, tokens=tokens, mask=torch.ones(tokens.shape[:2], dtype=torch.bool,
                                                                       device=tokens.device))


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level BPE (vocab, merges) rebuilt from the file open_clip ships."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe  # noqa: PLC0415

    with gzip.open(default_bpe()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(m) for m in merges]


def make_tiny_clip(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                   projection: int | None = None, seed: int = 0) -> Path:
    """Write ``tokenizer/`` and ``text_encoder/`` of a tiny random CLIP text tower (SD layout)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    out = Path(out_dir)
    tok_dir = out / "tokenizer"
    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="!",
                              model_max_length=77)
    tokenizer.save_pretrained(tok_dir)
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         hidden_act="gelu", projection_dim=projection or hidden,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=0)
    CLIPTextModel(cfg).save_pretrained(out / "text_encoder")
    return out
