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


def local_weights(model: str, key: str, subfolders: tuple[str, ...]) -> str:
    """The local folder of ``model``: the folder itself, or the snapshot of a hub id in the local
    Hugging Face cache. Nothing is downloaded (no network on most of our machines, and a hub id that
    is not cached would otherwise retry for a minute before failing): an id that is neither fails
    at once with what to do. ``key``: the config key that named it (for the message)."""
    if Path(model).is_dir():
        missing = [s for s in subfolders if not (Path(model) / s).is_dir()]
        if missing:
            raise WeightsError(f"'{model}' ({key}) has no {'/, '.join(missing)}/ folder; point {key} at a diffusers "
                               f"Stable Diffusion folder ({'/, '.join(subfolders)}/)")
        return model
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415

        path = snapshot_download(model, local_files_only=True, allow_patterns=[f"{s}/*" for s in subfolders])
    except Exception:  # noqa: BLE001 - not a valid id, not cached: the same to a user
        path = None
    if path is None or any(not (Path(path) / s).is_dir() for s in subfolders):
        raise WeightsError(f"{key}='{model}' is neither a local folder nor in the local Hugging Face cache; on a "
                           f"machine with network access run `huggingface-cli download {model} --local-dir DIR` "
                           f"and set {key}=DIR")
    return path


def same_model(a: str, b: str) -> bool:
    """Whether two model names (folders or hub ids) are the same model, so one loaded text tower can
    serve both (folders compare by their real path)."""
    if Path(a).is_dir() and Path(b).is_dir():
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def _load_error(model: str, what: str, err: Exception) -> WeightsError:
    return WeightsError(f"cannot load the CLIP {what} from '{model}' ({err.__class__.__name__}: the files are there "
                        "but unreadable); download the model again (`huggingface-cli download "
                        "stabilityai/stable-diffusion-2-1-base --local-dir DIR`)")


class CLIPTextEncoder(TextEncoder):
    def __init__(self, model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 key: str = "text.model"):
        from transformers import CLIPTextModel, CLIPTokenizer  # noqa: PLC0415 - optional extra

        local = Path(model).is_dir()
        path = local_weights(model, key, ("tokenizer", "text_encoder"))
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        except Exception as e:  # noqa: BLE001 - many loader exceptions mean the same to a user
            raise _load_error(model, "tokenizer", e) from None
        try:
            self.model = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype,
                                                       local_files_only=True)
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


def byte_symbols() -> dict[int, str]:
    """Byte-level BPE's byte -> symbol table: the printable Latin-1 bytes ('!'..'~', '\xa1'..'\xac',
    '\xae'..'\xff') stand for themselves, every other byte b for chr(256 + n), n counting those bytes in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table  # in this order (kept bytes first): the order of the vocabulary's first 256 entries


def _bpe_file() -> Path:
    """The BPE merges file open_clip ships, found without importing open_clip (whose import pulls in
    torchvision and timm, which a lean GPU machine does not have)."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError("writing a CLIP tokenizer needs the BPE vocabulary of the open_clip_torch package; "
                           "pip install open_clip_torch (or its wheel, without dependencies)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """CLIP's byte-level BPE (vocab, merges) rebuilt from the file open_clip ships."""
    with gzip.open(_bpe_file()) as f:
        merges = f.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(byte_symbols().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, [" ".join(m) for m in merges]


def save_clip_tokenizer(folder: Path, pad_token: str):
    """CLIP's real BPE tokenizer written into ``folder`` (vocab.json, merges.txt and transformers' files);
    returns (tokenizer, vocab). SD's tokenizer pads with "!", CLIPModel checkpoints with <|endoftext|>."""
    from transformers import CLIPTokenizer  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                              model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer, vocab


def make_tiny_clip(out_dir: str | Path, hidden: int = 32, layers: int = 2, heads: int = 2,
                   projection: int | None = None, seed: int = 0) -> Path:
    """Write ``tokenizer/`` and ``text_encoder/`` of a tiny random CLIP text tower (SD layout)."""
    from transformers import CLIPTextConfig, CLIPTextModel  # noqa: PLC0415

    out = Path(out_dir)
    tokenizer, vocab = save_clip_tokenizer(out / "tokenizer", pad_token="!")
    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                         hidden_act="gelu", projection_dim=projection or hidden,
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=0)
    CLIPTextModel(cfg).save_pretrained(out / "text_encoder")
    return out
