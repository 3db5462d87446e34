"""Frozen 2D priors behind one interface (see ``base.Prior``); ``build_prior`` maps
``prior.name`` to a constructor."""
from __future__ import annotations

from scalegen.priors.base import Prior, ddpm_alphas_cumprod
from scalegen.priors.oracle import OraclePrior, build_oracle_prior, mixture_posterior_mean
from scalegen.priors.oracle_world import OracleWorld, build_world


def build_prior(cfg, world: OracleWorld | None = None) -> Prior:
    if cfg.prior.name == "oracle":
        return build_oracle_prior(cfg, world if world is not None else build_world(cfg))
    raise AssertionError(f"unhandled prior {cfg.prior.name}")  # config validation prevents this


__all__ = ["Prior", "OraclePrior", "OracleWorld", "build_prior", "build_world", "ddpm_alphas_cumprod",
           "mixture_posterior_mean"]
