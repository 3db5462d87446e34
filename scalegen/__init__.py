"""scalegen: amortized text-to-3D generators trained by score distillation."""
__version__ = "0.1.0"
