"""Webdataset shards of a prompt corpus, with optional frozen text embeddings.

Layout of ``scalegen data build --out DIR``::

    DIR/manifest.json                  counts, encoder id + config hash, per-shard sha256 and sizes
    DIR/report.json                    duplicates and prompts over the encoder's token limit
    DIR/<split>/shard-000000.tar       webdataset tar: per sample ``<key>.txt`` (+ ``<key>.emb``)
    DIR/<split>/shard-000000.tar.json  sidecar written after the tar is complete (resumable builds)

The key is ``blake2b(prompt)[:8]`` in hex: stable across builds and machines, independent of the
corpus order. Samples are sorted by key, so every shard is a pseudo-random slice of the corpus
(the loader's shard-level shuffle then mixes well even for ordered corpora such as AT2520).

``<key>.emb`` holds, for V variants (the plain prompt, then ``view_prompt(p, v)`` for ``v`` in
``VIEWS`` with ``store=views``): int16 token counts [V], fp16 pooled [V, D], fp16 tokens [V, L, D]
(tokens omitted with ``store=pooled``), optionally zlib-compressed (``.embz``). One member per
sample keeps the tar walk cheap (each member costs a header).

Builds split the shards across processes (``accelerate launch``): process p encodes shards
p, p + P, ... Each finished shard gets a sidecar with its plan hash, so an interrupted build
rerun with the same arguments skips finished shards and rewrites missing or damaged ones.
"""
from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scalegen.atomic import write_json, write_text, writing
from scalegen.data.prompts import check_encodable, corpus_splits, read_corpus_lines
from scalegen.errors import DataError
from scalegen.text.base import VIEWS, view_prompt

FORMAT = "scalegen-shards-v1"
STORES = ("none", "pooled", "plain", "views")


def prompt_key(prompt: str) -> str:
    return hashlib.blake2b(prompt.encode(), digest_size=8).hexdigest()


def n_variants(store: str) -> int:
    return 1 + len(VIEWS) if store == "views" else 1


def variants(prompt: str, store: str) -> list[str]:
    return [prompt] + ([view_prompt(prompt, v) for v in VIEWS] if store == "views" else [])


def encoder_info(encoder, store: str, compress: str) -> dict:
    """What the loader must match: the id, and a hash of everything that shapes the stored bytes."""
    info = {"id": encoder.id, "dim": int(encoder.dim), "tokens": int(encoder.max_tokens), "store": store,
            "views": list(VIEWS) if store == "views" else [], "compress": compress, "dtype": "float16"}
    info["config_hash"] = hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]
    return info


def emb_layout(info: dict) -> tuple[int, int, int, bool]:
    """(V, D, L, has_tokens) of the ``.emb`` records described by a manifest's encoder entry."""
    return n_variants(info["store"]), info["dim"], info["tokens"], info["store"] != "pooled"


def emb_nbytes(info: dict) -> int:
    v, d, ln, tok = emb_layout(info)
    return 2 * (v + v * d + (v * ln * d if tok else 0))


def encode_records(encoder, prompts: list[str], info: dict) -> list[bytes]:
    """``.emb`` payloads of ``prompts``: one encoder call over all their variants."""
    store = info["store"]
    strings = [s for p in prompts for s in variants(p, store)]
    cond = encoder.encode(strings)
    v = n_variants(store)
    lens = cond.mask.sum(1).to("cpu").numpy().astype(np.int16).reshape(len(prompts), v)
    pooled = cond.pooled.to("cpu").half().numpy().reshape(len(prompts), -1)
    parts = [lens, pooled]
    if store != "pooled":
        parts.append(cond.tokens.to("cpu").half().numpy().reshape(len(prompts), -1))
    rows = np.concatenate([p.view(np.uint8).reshape(len(prompts), -1) for p in parts], axis=1)
    out = [r.tobytes() for r in rows]
    if info["compress"] == "zlib":
        out = [zlib.compress(b, 1) for b in out]
    return out


# --------------------------------------------------------------------------------------------- plan
@dataclass
class SplitPlan:
    name: str
    prompts: list[str]  # deduplicated, sorted by key
    shards: list[list[int]]  # indices into prompts, per shard


def plan_corpus(corpus: str, splits: list[str] | None, shard_size: int, column: str, encoder, store: str) -> tuple[list[SplitPlan], dict]:
    """Read, deduplicate (first occurrence wins) and cut every split into shards; the report says
    what was dropped or will be truncated."""
    if shard_size < 1:
        raise DataError("--shard-size must be at least 1 prompt per shard")
    available = corpus_splits(corpus)
    splits = splits or available
    report: dict = {"corpus": str(corpus), "splits": {}}
    plans = []
    for split in splits:
        if split not in available:
            raise DataError(f"corpus '{corpus}' has no split {split!r} (it has {', '.join(map(repr, available))})")
        lines = read_corpus_lines(corpus, split, column, split_flag="--split")
        if not lines:
            raise DataError(f"corpus '{corpus}' (split {split!r}) holds no prompts")
        if encoder is not None:  # every prompt is checked before the first shard is written
            check_encodable(corpus, lines, encoder, split, column)
        first: dict[str, int] = {}
        dups = []
        for prompt, line in lines:
            if prompt in first:
                dups.append({"prompt": prompt, "line": line, "first_line": first[prompt]})
            else:
                first[prompt] = line
        prompts = sorted(first, key=prompt_key)
        keys = [prompt_key(p) for p in prompts]
        if len(set(keys)) != len(keys):  # 64-bit keys: never seen, but never silently merge prompts
            raise DataError(f"corpus '{corpus}': two different prompts share a key; report this corpus as a bug")
        rec: dict = {"read": len(lines), "kept": len(prompts), "duplicates": len(dups),
                     "duplicates_action": "dropped (first occurrence kept)", "duplicate_examples": dups[:10]}
        if encoder is not None:
            limit = encoder.max_tokens
            over = [p for p in prompts if encoder.count_tokens(p) > limit]
            over_v = ([p for p in prompts if encoder.count_tokens(view_prompt(p, "overhead")) > limit]
                      if store == "views" else [])
            rec.update({"token_limit": limit, "over_limit": len(over), "over_limit_views": len(over_v),
                        "over_limit_action": f"kept; the encoder truncates them to {limit} tokens",
                        "over_limit_examples": over[:10]})
        report["splits"][split] = rec
        shards = [list(range(i, min(i + shard_size, len(prompts)))) for i in range(0, len(prompts), shard_size)]
        plans.append(SplitPlan(split, prompts, shards))
    return plans, report


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _plan_hash(keys: list[str], info: dict | None) -> str:
    h = hashlib.sha256(json.dumps(info, sort_keys=True).encode())
    for k in keys:
        h.update(k.encode())
    return h.hexdigest()[:16]


def write_shard(path: Path, prompts: list[str], records: list[bytes] | None, info: dict | None) -> dict:
    """Write one tar atomically (temp name, then rename) and its sidecar; returns the sidecar."""
    import webdataset as wds  # noqa: PLC0415

    ext = "embz" if info and info["compress"] == "zlib" else "emb"
    with writing(path) as tmp, open(tmp, "wb") as f:
        w = wds.TarWriter(f, encoder=False, mtime=0)
        for i, p in enumerate(prompts):
            sample = {"__key__": prompt_key(p), "txt": p.encode()}
            if records is not None:
                sample[ext] = records[i]
            w.write(sample)
        w.close()
    side = {"count": len(prompts), "bytes": path.stat().st_size, "sha256": _sha256(path),
            "plan": _plan_hash([prompt_key(p) for p in prompts], info)}
    write_text(path.with_name(path.name + ".json"), json.dumps(side))
    return side


def _finished(path: Path, plan: str) -> dict | None:
    side = path.with_name(path.name + ".json")
    if not (path.is_file() and side.is_file()):
        return None
    try:
        s = json.loads(side.read_text())
    except json.JSONDecodeError:
        return None
    return s if s.get("plan") == plan and s.get("bytes") == path.stat().st_size else None


def foreign_shards(out: Path, plans: list[SplitPlan], info: dict | None) -> list[Path]:
    """Finished shards in ``out`` that this build would not write: another corpus, other encoder
    settings or another shard size (their sidecar's plan hash differs, or their split or index is not
    in the plan). Unfinished shards of an interrupted build are not foreign: a rerun rewrites them."""
    expected = {(sp.name, i): _plan_hash([prompt_key(sp.prompts[j]) for j in idx], info)
                for sp in plans for i, idx in enumerate(sp.shards)}
    foreign = []
    for side in sorted(out.glob("*/shard-*.tar.json")):
        try:
            plan = json.loads(side.read_text()).get("plan")
            index = int(side.name[len("shard-"):-len(".tar.json")])
        except (json.JSONDecodeError, ValueError, AttributeError):
            plan, index = None, -1
        if expected.get((side.parent.name, index)) != plan:
            foreign.append(side.with_name(side.name[:-len(".json")]))
    return foreign


def remove_shards(out: Path) -> None:
    """Delete what ``scalegen data build`` writes in ``out`` (shards, sidecars, manifest, report) and
    nothing else."""
    for f in [*out.glob("*/shard-*.tar*"), out / "manifest.json", out / "report.json"]:
        if f.is_file():
            f.unlink()


def build_shards(corpus: str, out: str | Path, encoder=None, shard_size: int = 1000, splits: list[str] | None = None,
                 column: str = "prompt", store: str | None = None, compress: str = "none", batch_size: int = 256,
                 process_index: int = 0, num_processes: int = 1, log=print, overwrite: bool = False,
                 barrier=lambda: None) -> dict:
    """Write this process's shards (``i % num_processes == process_index``); returns the plan
    summary. The main process calls ``write_manifest`` after every process finished. A folder that
    holds shards of another build is refused unless ``overwrite`` (then process 0 removes them first;
    ``barrier`` makes the other processes wait for that)."""
    if store is None:
        store = "none" if encoder is None else "plain"
    if store not in STORES:
        raise DataError(f"--store must be one of {', '.join(STORES)}, not '{store}'")
    if store != "none" and encoder is None:
        raise DataError(f"--store {store} needs an --encoder (bow or clip) to compute the embeddings")
    if compress not in ("none", "zlib"):
        raise DataError(f"--compress must be none or zlib, not '{compress}'")
    out = Path(out)
    info = encoder_info(encoder, store, compress) if store != "none" else None
    plans, report = plan_corpus(corpus, splits, shard_size, column, encoder, store)
    if overwrite:
        if process_index == 0:
            remove_shards(out)
        barrier()
    else:
        foreign = foreign_shards(out, plans, info)
        if foreign:
            raise DataError(f"'{out}' holds {len(foreign)} shard(s) of another build (e.g. "
                            f"{foreign[0].relative_to(out)}: other prompts, encoder settings or shard size); pass "
                            "--overwrite to remove them first, or choose another --out")
    done = written = 0
    t0 = time.perf_counter()
    for sp in plans:
        (out / sp.name).mkdir(parents=True, exist_ok=True)
        for i, idx in enumerate(sp.shards):
            if i % num_processes != process_index:
                continue
            path = out / sp.name / f"shard-{i:06d}.tar"
            prompts = [sp.prompts[j] for j in idx]
            if _finished(path, _plan_hash([prompt_key(p) for p in prompts], info)) is not None:
                done += 1
                continue
            records = None
            if info is not None:
                records = []
                for b in range(0, len(prompts), batch_size):
                    records += encode_records(encoder, prompts[b:b + batch_size], info)
            write_shard(path, prompts, records, info)
            written += 1
    if process_index == 0:
        write_json(out / "report.json", report)
    log(f"process {process_index}/{num_processes}: wrote {written} shard(s), {done} already finished "
        f"(resumed) in {time.perf_counter() - t0:.1f} s")
    return {"plans": plans, "report": report, "encoder": info, "written": written, "resumed": done}


def write_manifest(corpus: str, out: str | Path, plans: list[SplitPlan], report: dict, info: dict | None) -> dict:
    out = Path(out)
    manifest: dict = {"format": FORMAT, "corpus": str(corpus), "encoder": info, "splits": {}}
    for sp in plans:
        shards = []
        for i, idx in enumerate(sp.shards):
            path = out / sp.name / f"shard-{i:06d}.tar"
            side = _finished(path, _plan_hash([prompt_key(sp.prompts[j]) for j in idx], info))
            if side is None:
                raise DataError(f"shard '{path}' is missing or unfinished; rerun the same `scalegen data build` "
                                "command (it resumes)")
            shards.append({"name": f"{sp.name}/{path.name}", "count": side["count"], "bytes": side["bytes"],
                           "sha256": side["sha256"]})
        manifest["splits"][sp.name] = {"count": len(sp.prompts), "shards": shards}
    manifest["report"] = {k: {kk: vv for kk, vv in v.items() if not kk.endswith("examples")}
                          for k, v in report["splits"].items()}
    write_json(out / "manifest.json", manifest, indent=1)
    return manifest


def load_manifest(source: str | Path) -> tuple[dict, str]:
    """(manifest, base) for a shard folder or a manifest.json path; ``base`` is the folder."""
    p = Path(source)
    if p.is_dir():
        p = p / "manifest.json"
    if not p.is_file():
        raise DataError(f"no shard manifest at '{p}'; build shards with `scalegen data build --corpus FILE --out DIR` "
                        "and set data.shards=DIR")
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}: invalid manifest JSON ({e.msg}); rebuild the shards") from None
    if m.get("format") != FORMAT:
        raise DataError(f"'{p}' is not a scalegen shard manifest (format {m.get('format')!r}, expected {FORMAT})")
    return m, str(p.parent)


def check_encoder(manifest: dict, encoder, source: str) -> None:
    """Refuse cached embeddings that another text encoder built."""
    info = manifest.get("encoder")
    if info is None or encoder is None:
        return
    if info["id"] != encoder.id:
        raise DataError(f"shards in '{source}' hold embeddings of text encoder '{info['id']}' but this run uses "
                        f"'{encoder.id}'; rebuild them with this run's encoder (`scalegen data build --encoder ...`) "
                        "or set text.* to match")


def summary_lines(report: dict) -> list[str]:
    lines = []
    for split, r in report["splits"].items():
        s = f"{split}: {r['kept']} prompts ({r['read']} read, {r['duplicates']} duplicates dropped)"
        if "over_limit" in r:
            s += (f", {r['over_limit']} over the {r['token_limit']}-token limit"
                  f" ({r['over_limit_views']} with a view suffix): {r['over_limit_action']}")
        lines.append(s)
    return lines
