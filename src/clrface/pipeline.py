"""The public names of the restore path in one namespace (``from clrface.pipeline import Restorer, demo_image``).

Each name is defined by the module that owns it: options (what to do), restorer (faces), photo (whole photos),
batch (folders), demo, device; new code imports from those.
"""

from clrface.batch import DONE_DIR, restore_files
from clrface.demo import DEMO_SEED, demo_image, run_demo
from clrface.device import DTYPES, auto_dtype, cpu_flags, resolve_device, resolve_dtype
from clrface.model_folder import resolve_model
from clrface.options import COLOR_MODES, MODES, FidelityMap, RestoreOptions
from clrface.photo import FaceResult, RestoreResult, is_monochrome, keep_tone
from clrface.restorer import RestoredFaces, Restorer, face_noise

__all__ = ["COLOR_MODES", "DEMO_SEED", "DONE_DIR", "DTYPES", "MODES", "FaceResult", "FidelityMap", "RestoreOptions",
           "RestoreResult", "RestoredFaces", "Restorer", "auto_dtype", "cpu_flags", "demo_image", "face_noise",
           "is_monochrome", "keep_tone", "resolve_device", "resolve_dtype", "resolve_model", "restore_files",
           "run_demo"]
