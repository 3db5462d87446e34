"""scalegen: amortized text-to-3D generators trained by score distillation."""
__version__ = "0.1.0"


def __getattr__(name: str):
    """``from scalegen import TextTo3DPipeline`` without importing torch for ``import scalegen``."""
    if name in ("TextTo3DPipeline", "Asset"):
        from scalegen import pipeline  # noqa: PLC0415

        return getattr(pipeline, name)
    raise AttributeError(f"module 'scalegen' has no attribute {name!r}")
