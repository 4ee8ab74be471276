"""clrface: blind face restoration by conditional latent refinement (CLR-Face, Suin & Chellappa).

``from clrface import Restorer`` is the Python API (see README, "Python API"). It is imported lazily so that
torch-free parts of the package (e.g. the ONNX runtime) import without torch.
"""

__version__ = "0.1.0"
__all__ = ["Restorer", "RestoreOptions", "RestoreResult"]


def __getattr__(name: str):
    if name in __all__:
        from clrface import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'clrface' has no attribute {name!r}")
