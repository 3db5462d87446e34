"""One prompt's 3D Gaussians as a trainable module (per-prompt refinement), with 3DGS's adaptive
density control.

``GaussianScene`` is a ``Generator`` whose field does not depend on the text: it IS the prompt's
scene, so the amortized trainer (``train.loop``) optimises it unchanged, one prompt per step. Its
parameters are the raw tensors of the 3DGS PLY layout (means, log scales, quaternions w x y z,
opacity logits, SH coefficients: ``sh_dc`` [G, 3] and ``sh_rest`` [G, K-1, 3]).

Densification (Kerbl et al. 2023, Sec. 5.2), every ``densify_every`` steps in [densify_from, densify_until):
  * grad_i = mean over the views that saw Gaussian i of |dL/d(mean2d_i)| in NDC units;
  * grad_i >= ``densify_grad`` and max scale <= ``percent_dense`` * extent: clone it;
  * grad_i >= ``densify_grad`` and larger: split it into 2 drawn from itself, scales / 1.6;
  * prune opacity < ``min_opacity`` and max scale > ``max_scale`` * extent;
  * ``max_gaussians`` caps the count (the largest gradients are densified first).
Optionally (``opacity_reset_every`` > 0) opacities are reset to at most 0.01 (3DGS's floater removal).
The optimizer's moment estimates follow the rows (kept rows keep theirs, new rows start at zero), so
Adam (or Adan) carries on as if the set had always been this one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from scalegen.config import step_position
from scalegen.errors import ConfigError, TrainingError
from scalegen.generators.base import Generator
from scalegen.render.base import RenderOutput
from scalegen.render.gaussians import GaussianField, GaussianRenderOutput, matrix_to_quaternion, quaternion_to_matrix, rgb_to_sh
from scalegen.text.base import TextCond

ROWS = ("means", "log_scales", "quats", "opacity_logits", "sh_dc", "sh_rest")  # parameters, one row per Gaussian


def logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def nearest_distance(points: Tensor, k: int = 3, chunk: int = 2048) -> Tensor:
    """Root mean squared distance of every point to its ``k`` nearest others (3DGS's initial scale)."""
    out = points.new_empty(len(points))
    k = min(k, len(points) - 1)
    if k <= 0:
        return out.fill_(0.01)
    for s in range(0, len(points), chunk):
        d2 = torch.cdist(points[s:s + chunk], points).pow(2)
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = float("inf")
        out[s:s + chunk] = d2.topk(k, dim=1, largest=False).values.mean(1).sqrt()
    return out.clamp(min=1e-4)


def frame_from_normals(normals: Tensor) -> Tensor:
    """Rotations [G, 3, 3] whose third column is the unit ``normals`` [G, 3] (a disc's short axis)."""
    n = torch.nn.functional.normalize(normals, dim=-1)
    helper = torch.where(n[:, :1].abs() < 0.9, torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]))
    a = torch.nn.functional.normalize(torch.linalg.cross(helper, n), dim=-1)
    b = torch.linalg.cross(n, a)
    return torch.stack([a, b, n], -1)


class GaussianScene(Generator):
    def __init__(self, n: int = 4096, sh_degree: int = 0, radius: float = 0.35, init_opacity: float = 0.1,
                 extent: float = 0.75, level: float = 0.5, max_steps: int = 1000, densify_from: float = 0.0,
                 densify_until: float = 0.6, densify_every: int = 50, densify_grad: float = 2e-4,
                 percent_dense: float = 0.01, min_opacity: float = 0.005, max_scale: float = 0.1,
                 max_gaussians: int = 20000, opacity_reset_every: int = 0, init_colour: float = 0.5):
        super().__init__()
        self.sh_degree, self.extent, self.level, self.init_opacity = sh_degree, extent, level, init_opacity
        self.densify_from = step_position(densify_from, max_steps)
        self.densify_until = step_position(densify_until, max_steps)
        self.densify_every, self.densify_grad, self.percent_dense = densify_every, densify_grad, percent_dense
        self.min_opacity, self.max_scale, self.max_gaussians = min_opacity, max_scale, max_gaussians
        self.opacity_reset_every = opacity_reset_every
        k = (sh_degree + 1) ** 2
        for name, shape in (("means", (3,)), ("log_scales", (3,)), ("quats", (4,)), ("opacity_logits", ()),
                            ("sh_dc", (3,)), ("sh_rest", (k - 1, 3))):
            self.register_parameter(name, nn.Parameter(torch.zeros(0, *shape)))
        # Densification statistics (saved in checkpoints, so a resumed run densifies identically).
        self.register_buffer("grad_accum", torch.zeros(0))
        self.register_buffer("grad_count", torch.zeros(0))
        # The start: ``n`` points uniform in the ball of ``radius`` (the SDF generators' start sphere).
        u = torch.randn(n, 3)
        pts = torch.nn.functional.normalize(u, dim=-1) * radius * torch.rand(n, 1) ** (1 / 3)
        self.set_points(pts, torch.full((n, 3), init_colour))

    # --- starts ----------------------------------------------------------------------------------
    @torch.no_grad()
    def set_points(self, points: Tensor, colours: Tensor, normals: Optional[Tensor] = None,
                   opacity: Optional[float] = None, flatness: float = 0.3) -> None:
        """Start from a coloured point set: one Gaussian per point, isotropic with the 3-nearest-neighbour
        distance as scale (3DGS's start), or, with ``normals``, a disc tangent to the surface whose normal
        axis is ``flatness`` times shorter."""
        g = len(points)
        if g == 0:
            raise ConfigError("the start has no points; give a non-empty point cloud or mesh")
        s = nearest_distance(points.float())
        scales = s[:, None].expand(g, 3).clone()
        if normals is not None:
            rot = frame_from_normals(normals.float())
            quats = matrix_to_quaternion(rot)
            scales[:, 2] = scales[:, 2] * flatness
        else:
            quats = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(g, 4)
        o = torch.full((g,), self.init_opacity if opacity is None else opacity)
        k = (self.sh_degree + 1) ** 2
        self.set_rows({"means": points.float(), "log_scales": scales.log(), "quats": quats.clone(),
                       "opacity_logits": logit(o), "sh_dc": rgb_to_sh(colours.float().clamp(0, 1)),
                       "sh_rest": torch.zeros(g, k - 1, 3)})

    @torch.no_grad()
    def set_rows(self, rows: dict[str, Tensor]) -> None:
        """Replace every Gaussian (a start; the optimizer is built afterwards)."""
        g = len(rows["means"])
        for name in ROWS:
            getattr(self, name).data = rows[name].to(self.means).reshape(g, *getattr(self, name).shape[1:]).clone()
        self.grad_accum = torch.zeros(g, device=self.means.device)
        self.grad_count = torch.zeros(g, device=self.means.device)

    # --- the Generator interface -------------------------------------------------------------------
    @property
    def n_gaussians(self) -> int:
        return self.means.shape[0]

    def field(self) -> GaussianField:
        sh = torch.cat([self.sh_dc[:, None], self.sh_rest], 1)
        return GaussianField(self.means, self.log_scales, self.quats, self.opacity_logits, sh, level=self.level)

    def forward(self, cond: TextCond, z: Optional[Tensor] = None) -> GaussianField:
        """The scene (it belongs to one prompt: the condition only says how many are asked for)."""
        if len(cond) != 1:
            raise ConfigError(f"a per-prompt Gaussian scene renders its one prompt, not {len(cond)}; per-prompt "
                              "runs need data.prompts_per_step=1")
        return self.field()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group per attribute, as 3DGS sets its learning rates (``sh_rest`` is empty at degree 0)."""
        return {"means": [self.means], "scales": [self.log_scales], "quats": [self.quats],
                "opacity": [self.opacity_logits], "sh_dc": [self.sh_dc], "sh_rest": [self.sh_rest]}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Checkpoints hold however many Gaussians densification made: take their row count first (in
        place, so an optimizer built already keeps its parameters; no graph exists yet at load time)."""
        for name in (*ROWS, "grad_accum", "grad_count"):
            key = prefix + name
            if key in state_dict:
                t = getattr(self, name)
                if state_dict[key].shape != t.shape:
                    if isinstance(t, nn.Parameter):
                        t.data = t.new_empty(state_dict[key].shape)
                    else:
                        setattr(self, name, t.new_empty(state_dict[key].shape))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # --- adaptive density control ------------------------------------------------------------------
    @torch.no_grad()
    def after_backward(self, out: RenderOutput) -> None:
        """Accumulate each visible Gaussian's screen-space gradient norm (NDC units, per view)."""
        if not isinstance(out, GaussianRenderOutput) or out.means2d is None:
            raise TypeError("GaussianScene needs the GaussianRasterizer's output (render it with that renderer)")
        if out.means2d.grad is None:  # no Gaussian reached a pixel of any view: nothing can get a gradient again
            raise TrainingError(f"the Gaussian scene vanished: none of its {self.n_gaussians} Gaussians covers a pixel "
                                f"(mean opacity {float(torch.sigmoid(self.opacity_logits).mean()):.1e}); the "
                                "refinement collapsed: start it from a run or an asset (--init-from), or from "
                                "another one if it had one, or lower optim.group_lr.opacity")
        h, w = out.rgb.shape[-2:]
        g = torch.nan_to_num(out.means2d.grad) * torch.tensor([0.5 * w, 0.5 * h], device=out.means2d.device)
        seen = out.visible.float()
        self.grad_accum += (g.norm(dim=-1) * seen).sum(0)
        self.grad_count += seen.sum(0)

    @torch.no_grad()
    def adapt(self, step: int, optimizer: torch.optim.Optimizer) -> bool:
        """Densify / prune / reset opacities when ``step`` (optimizer steps done) says so."""
        changed = False
        if self.densify_from <= step < self.densify_until and step % self.densify_every == 0:
            self.densify_and_prune(optimizer)
            changed = True
        if self.opacity_reset_every and step % self.opacity_reset_every == 0 and step < self.densify_until:
            capped = logit(torch.sigmoid(self.opacity_logits).clamp(max=0.01))
            self._edit(optimizer, torch.arange(self.n_gaussians), {}, reset={"opacity_logits": capped})
            changed = True
        return changed

    def densify_and_prune(self, optimizer: torch.optim.Optimizer) -> None:
        grads = self.grad_accum / self.grad_count.clamp(min=1)
        big = self.log_scales.exp().amax(-1) > self.percent_dense * self.extent
        want = torch.nonzero(grads >= self.densify_grad).squeeze(1)
        room = max(self.max_gaussians - self.n_gaussians, 0)
        # a split adds one Gaussian net (two replace one), a clone adds one
        want = want[grads[want].argsort(descending=True)][:room]
        split, clone = want[big[want]], want[~big[want]]
        new = {name: getattr(self, name)[clone] for name in ROWS}
        if len(split):
            s = self.log_scales[split].exp()
            rot = quaternion_to_matrix(self.quats[split])
            for name in ROWS:
                new[name] = torch.cat([new[name], getattr(self, name)[split].repeat(2, *[1] * (new[name].dim() - 1))])
            offset = (rot.repeat(2, 1, 1) @ (torch.randn(2 * len(split), 3, 1) * s.repeat(2, 1)[..., None]))[..., 0]
            new["means"][len(clone):] += offset
            new["log_scales"][len(clone):] = (s.repeat(2, 1) / 1.6).log()
        keep = torch.ones(self.n_gaussians, dtype=torch.bool)
        keep[split] = False  # the split originals are replaced by their two halves
        scale = self.log_scales.exp().amax(-1)
        keep &= torch.sigmoid(self.opacity_logits) >= self.min_opacity
        keep &= scale <= self.max_scale * self.extent
        new_opac = torch.sigmoid(new["opacity_logits"])
        new_ok = (new_opac >= self.min_opacity) & (new["log_scales"].exp().amax(-1) <= self.max_scale * self.extent)
        if not bool(keep.any()) and not bool(new_ok.any()):
            return  # never prune the scene away entirely: nothing would get a gradient again
        self._edit(optimizer, torch.nonzero(keep).squeeze(1), {n: t[new_ok] for n, t in new.items()})

    def _edit(self, optimizer: torch.optim.Optimizer, keep: Tensor, appended: dict[str, Tensor],
              reset: Optional[dict[str, Tensor]] = None) -> None:
        """Rows ``keep`` of every parameter, then ``appended`` rows; each parameter's optimizer state follows
        (kept rows keep their moments, appended rows start at zero). ``reset``: new values for some
        parameters' kept rows, whose moments restart at zero (3DGS's opacity reset).

        The parameters are new tensors (swapped into the module and the optimizer's groups and state):
        resizing a leaf in place would leave autograd's cached accumulator, still held by the last
        step's graph, expecting the old shape."""
        n_new = len(appended["means"]) if appended else 0
        for name in ROWS:
            old = getattr(self, name)
            parts = [reset[name] if reset and name in reset else old.data[keep]]
            if n_new:
                parts.append(appended[name].to(old))
            new = nn.Parameter(torch.cat(parts))
            state = optimizer.state.pop(old, None)
            if state:
                for key, value in state.items():
                    if torch.is_tensor(value) and value.shape == old.shape:
                        kept = torch.zeros_like(value[keep]) if reset and name in reset else value[keep]
                        state[key] = torch.cat([kept, value.new_zeros(n_new, *value.shape[1:])])
                optimizer.state[new] = state
            for group in optimizer.param_groups:
                group["params"] = [new if q is old else q for q in group["params"]]
            setattr(self, name, new)
        g = self.n_gaussians
        self.grad_accum = torch.zeros(g, device=self.means.device)
        self.grad_count = torch.zeros(g, device=self.means.device)


def build_gaussian_scene(cfg) -> GaussianScene:
    gs = cfg.generator.gaussians
    return GaussianScene(n=gs.n_init, sh_degree=gs.sh_degree, radius=cfg.generator.sdf_radius,
                         init_opacity=gs.init_opacity, extent=cfg.render.bound, level=gs.mesh_level,
                         max_steps=cfg.train.max_steps, densify_from=gs.densify_from, densify_until=gs.densify_until,
                         densify_every=gs.densify_every, densify_grad=gs.densify_grad, percent_dense=gs.percent_dense,
                         min_opacity=gs.min_opacity, max_scale=gs.max_scale, max_gaussians=gs.max_gaussians,
                         opacity_reset_every=gs.opacity_reset_every)
