"""``scalegen gallery``: a static page to browse assets, viewable with no network and no server.

The site is ``index.html`` (styles and script inline), ``viewer/`` (Google's <model-viewer>, an
Apache-2.0 web component that bundles three.js, copied from its npm package when the site is
built, with its licence) and ``assets/`` (the GLBs, turntables, and each GLB wrapped in a small
script ``NAME.glb.js``). Browsers refuse ``fetch`` of ``file://`` URLs, so the page loads a
model by adding that script tag when its card scrolls into view; the script hands the GLB over
as base64 and the page gives the viewer a blob URL. Served over HTTP the page works the same.

Where the viewer's JavaScript comes from (first found): ``--viewer FILE``, ``$SCALEGEN_MODEL_VIEWER``,
``node_modules/`` under the current folder or the scalegen checkout (``npm ci`` installs it
there, pinned by package-lock.json), ``~/.cache/scalegen/npm``; failing all, ``npm install``
into that cache (from whatever registry npm is configured for).
"""
from __future__ import annotations

import base64
import html
import json
import os
import shutil
import subprocess
from pathlib import Path

from scalegen.errors import ExportError

VIEWER_PACKAGE = "@google/model-viewer"
VIEWER_VERSION = "4.4.0"  # keep in step with package.json
VIEWER_BUNDLE = Path("node_modules") / VIEWER_PACKAGE / "dist" / "model-viewer-umd.min.js"
CACHE = Path.home() / ".cache" / "scalegen" / "npm"


def find_viewer(explicit: str | None = None, log=print) -> Path:
    """Path of model-viewer's UMD bundle (see the module docstring for the search order)."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ExportError(f"--viewer '{explicit}' does not exist; point it at model-viewer-umd.min.js")
        return p
    env = os.environ.get("SCALEGEN_MODEL_VIEWER")
    if env:
        if not Path(env).is_file():
            raise ExportError(f"SCALEGEN_MODEL_VIEWER='{env}' does not exist; point it at model-viewer-umd.min.js")
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    for root in (Path.cwd(), checkout, CACHE):
        if (root / VIEWER_BUNDLE).is_file():
            return root / VIEWER_BUNDLE
    npm = shutil.which("npm")
    if npm is None:
        raise ExportError(f"the gallery needs {VIEWER_PACKAGE}'s JavaScript and npm is not installed: install "
                          f"Node.js and run `npm ci` in the scalegen checkout, or pass --viewer FILE")
    log(f"installing {VIEWER_PACKAGE}@{VIEWER_VERSION} into {CACHE} (once) ...")
    CACHE.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([npm, "install", "--prefix", str(CACHE), "--no-audit", "--no-fund", "--no-save",
                        f"{VIEWER_PACKAGE}@{VIEWER_VERSION}"], capture_output=True, text=True)
    if r.returncode != 0 or not (CACHE / VIEWER_BUNDLE).is_file():
        last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ExportError(f"npm could not install {VIEWER_PACKAGE} ({last[0]}); run `npm ci` in the scalegen "
                          "checkout or pass --viewer FILE")
    return CACHE / VIEWER_BUNDLE


def _viewer_files(bundle: Path) -> list[tuple[Path, str]]:
    """(source, name in viewer/) for the bundle and the licences of what it contains."""
    files = [(bundle, "model-viewer-umd.min.js")]
    package = bundle.parent.parent
    for src, name in ((package / "LICENSE", "LICENSE-model-viewer.txt"),
                      (package.parent.parent / "three" / "LICENSE", "LICENSE-three.txt")):
        if src.is_file():
            files.append((src, name))
    return files


def build_site(assets_dir: Path, entries: list[dict], out: Path, viewer: Path, title: str) -> Path:
    """Write ``out``/index.html, viewer/ and assets/ (the entries' files copied from ``assets_dir``
    unless they are already there). ``entries`` are manifest rows (prompt, mesh, turntable, ...)."""
    (out / "viewer").mkdir(parents=True, exist_ok=True)
    for src, name in _viewer_files(viewer):
        shutil.copyfile(src, out / "viewer" / name)
    dest = out / "assets"
    dest.mkdir(exist_ok=True)
    cards = []
    for i, e in enumerate(entries):
        mesh = assets_dir / e["mesh"]
        if not mesh.is_file():
            raise ExportError(f"'{mesh}' is listed in the manifest but missing; regenerate the assets")
        if not mesh.name.lower().endswith(".glb"):
            raise ExportError(f"the gallery shows GLB files; '{mesh.name}' is not one (generate with --format glb)")
        for name in (e["mesh"], e.get("turntable")):
            if name and (assets_dir / name).resolve() != (dest / name).resolve():
                if not (assets_dir / name).is_file():
                    raise ExportError(f"'{assets_dir / name}' is listed in the manifest but missing")
                shutil.copyfile(assets_dir / name, dest / name)
        key = f"m{i}"
        payload = base64.b64encode((dest / e["mesh"]).read_bytes()).decode()
        (dest / f"{e['mesh']}.js").write_text(f"scalegenModel({json.dumps(key)}, \"{payload}\");\n")
        cards.append(_card(key, e))
    page = PAGE.format(title=html.escape(title), count=len(entries), cards="\n".join(cards), script=SCRIPT)
    (out / "index.html").write_text(page)
    return out / "index.html"


def _card(key: str, e: dict) -> str:
    prompt = html.escape(e["prompt"])
    mesh = html.escape(e["mesh"], quote=True)
    tt = e.get("turntable")
    if tt and tt.endswith(".mp4"):
        turntable = (f'<video src="assets/{html.escape(tt, quote=True)}" autoplay loop muted playsinline '
                     f'aria-label="turntable of {prompt}"></video>')
    elif tt:
        turntable = f'<img src="assets/{html.escape(tt, quote=True)}" alt="turntable of {prompt}">'
    else:
        turntable = '<div class="none">no turntable</div>'
    tag = f' <span class="tag">{html.escape(e["tag"])}</span>' if e.get("tag") else ""
    stats = f'{e.get("vertices", "?")} vertices, {e.get("faces", "?")} faces{", textured" if e.get("textured") else ""}'
    return (f'<article class="card" data-prompt="{html.escape(e["prompt"].lower(), quote=True)}" data-key="{key}" '
            f'data-script="assets/{mesh}.js">\n'
            f'  <h2>{prompt}{tag}</h2>\n'
            f'  <div class="views">{turntable}\n'
            f'    <model-viewer camera-controls auto-rotate shadow-intensity="0.6" interaction-prompt="none" '
            f'alt="3D model of {prompt}"></model-viewer></div>\n'
            f'  <p class="stats">{stats} &middot; <a href="assets/{mesh}" download>{mesh}</a></p>\n'
            f'</article>')


SCRIPT = r"""
const cards = Array.from(document.querySelectorAll(".card"));
const status = document.getElementById("status");
const pending = new Map();  // key -> card waiting for its GLB script
let loaded = 0, failed = 0;

function report() {
  status.textContent = `${loaded} of ${cards.length} models loaded` + (failed ? `, ${failed} failed` : "");
  document.body.dataset.loaded = String(loaded);
  document.body.dataset.failed = String(failed);
}

// Called by assets/NAME.glb.js: the GLB as base64, handed to the card's viewer as a blob URL.
window.scalegenModel = function (key, b64) {
  const card = pending.get(key);
  if (!card) return;
  pending.delete(key);
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: "model/gltf-binary" }));
  card.querySelector("model-viewer").src = url;
};

function load(card) {
  if (card.dataset.requested) return;
  card.dataset.requested = "1";
  const viewer = card.querySelector("model-viewer");
  viewer.addEventListener("load", () => { card.dataset.state = "loaded"; loaded++; report(); });
  viewer.addEventListener("error", (e) => {
    card.dataset.state = "failed"; failed++; report();
    console.error("could not show", card.dataset.script, e.detail);
  });
  pending.set(card.dataset.key, card);
  const s = document.createElement("script");
  s.src = card.dataset.script;
  s.onerror = () => { card.dataset.state = "failed"; failed++; report(); console.error("missing", s.src); };
  document.head.appendChild(s);
}

const seen = new IntersectionObserver((items) => {
  for (const it of items) if (it.isIntersecting) { load(it.target); seen.unobserve(it.target); }
}, { rootMargin: "200px" });
cards.forEach((c) => seen.observe(c));

const search = document.getElementById("search");
const shown = document.getElementById("shown");
function filter() {
  const words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
  let n = 0;
  for (const c of cards) {
    const hit = words.every((w) => c.dataset.prompt.includes(w));
    c.hidden = !hit;
    n += hit;
  }
  shown.textContent = words.length ? `${n} of ${cards.length} shown` : "";
}
search.addEventListener("input", filter);
report();
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
  body {{ font-family: system-ui, sans-serif; margin: 0; background: #f4f4f2; color: #222; }}
  header {{ position: sticky; top: 0; background: #fff; padding: 12px 20px; box-shadow: 0 1px 4px #0002;
           display: flex; gap: 16px; align-items: center; flex-wrap: wrap; z-index: 1; }}
  h1 {{ font-size: 18px; margin: 0; }}
  #search {{ font-size: 15px; padding: 6px 10px; width: 280px; }}
  .meta {{ color: #666; font-size: 13px; }}
  main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 16px; padding: 20px; }}
  .card {{ background: #fff; border-radius: 8px; padding: 12px; box-shadow: 0 1px 3px #0002; }}
  .card h2 {{ font-size: 15px; margin: 0 0 8px; }}
  .tag {{ font-size: 11px; background: #e4ecf7; color: #245; border-radius: 4px; padding: 1px 6px; }}
  .views {{ display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }}
  .views > * {{ display: block; width: 100%; height: auto; aspect-ratio: 1; background: #eee; border-radius: 4px; }}
  .none {{ display: flex; align-items: center; justify-content: center; color: #999; font-size: 12px; }}
  .stats {{ font-size: 12px; color: #666; margin: 8px 0 0; }}
</style>
<script src="viewer/model-viewer-umd.min.js"></script>
</head>
<body>
<header>
  <h1>{title}</h1>
  <input id="search" type="search" placeholder="search prompts" aria-label="search prompts">
  <span class="meta">{count} assets &middot; <span id="status"></span> <span id="shown"></span></span>
</header>
<main>
{cards}
</main>
<script>{script}</script>
</body>
</html>
"""
