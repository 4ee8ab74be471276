"""clrface: blind face restoration by conditional latent refinement (CLR-Face, Suin & Chellappa).

``from clrface import Restorer`` is the Python API (see README, "Python API"). It is imported on first use so
that the torch-free parts of the package (the options, the ONNX runtime) import without torch.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["Restorer", "RestoreOptions", "RestoreResult"]
_HOMES = {"Restorer": "clrface.restorer", "RestoreOptions": "clrface.options", "RestoreResult": "clrface.photo"}


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'clrface' has no attribute {name!r}")
