"""Frozen 2D priors behind one interface (see ``base.Prior``); ``build_prior`` maps
``prior.name`` to a constructor."""
from __future__ import annotations

from scalegen.priors.base import Prior, ddpm_alphas_cumprod
from scalegen.priors.oracle import OraclePrior, build_oracle_prior, ground_truth_renderer, mixture_posterior_mean
from scalegen.priors.oracle_world import OracleWorld, build_world
from scalegen.priors.world import GroundTruth, World


def build_prior(cfg, world: World | None = None, text_encoder=None, device=None) -> Prior:
    """``text_encoder``: the run's encoder, reused by priors that embed text with the same tower
    (Stable Diffusion or MVDream with ``text.model == prior.model``); ``device``: where a neural prior lives."""
    if cfg.prior.name == "oracle":
        return build_oracle_prior(cfg, world if world is not None else build_world(cfg))
    if cfg.prior.name == "stable_diffusion":
        from scalegen.priors.stable_diffusion import build_sd_prior  # noqa: PLC0415 - needs the [sd] extra

        return build_sd_prior(cfg, text_encoder=text_encoder, device=device)
    if cfg.prior.name == "mvdream":
        from scalegen.priors.mvdream import build_mvdream_prior  # noqa: PLC0415 - needs the [sd] extra

        return build_mvdream_prior(cfg, text_encoder=text_encoder, device=device)
    if cfg.prior.name == "learned":
        from scalegen.priors.learned import build_learned_prior  # noqa: PLC0415 - needs the [sd] extra

        return build_learned_prior(cfg, world if world is not None else build_world(cfg), ground_truth_renderer(cfg),
                                   text_encoder=text_encoder, device=device)
    raise AssertionError(f"unhandled prior {cfg.prior.name}")  # config validation prevents this


def build_ground_truth(cfg, world: World | None = None) -> GroundTruth | None:
    """What ``build_prior(cfg).ground_truth()`` returns, without building the prior (a real prior's
    weights are not loaded to find out that it has no ground truth): the oracle world (``world`` when
    given) and the oracle's renderer for the oracle prior and for the learned prior trained on that world
    (priors/learned.py), else None."""
    if cfg.prior.name in ("oracle", "learned"):
        return GroundTruth(world if world is not None else build_world(cfg), ground_truth_renderer(cfg))
    return None


__all__ = ["GroundTruth", "Prior", "OraclePrior", "OracleWorld", "World", "build_ground_truth", "build_prior",
           "build_world", "ddpm_alphas_cumprod", "mixture_posterior_mean"]
