"""Import fixes for the packages this project pins, applied once when ``ablate`` is imported.
A leaf module: it imports nothing heavy (no torch), so the fast CLI paths stay fast."""
from __future__ import annotations

import importlib.util
import sys
import types


def bare_torch_fidelity() -> bool:
    """Let torch-fidelity's Inception extractor import where torchvision is absent; True if applied.

    torch-fidelity's package ``__init__`` imports every extractor it has, and the CLIP, VGG and
    DINOv2 ones import torchvision, which has no wheel for the CPU torch this project pins. The
    Inception extractor itself needs torch alone, and torchmetrics imports it (``torchmetrics``'
    own ``__init__`` reaches ``image.fid``) as soon as torch-fidelity is installed, so without
    this any torchmetrics import fails. Where torch-fidelity is installed and torchvision is not,
    the package is registered bare: its ``__init__`` never runs and its submodules import on
    demand. With torchvision installed nothing changes."""
    if "torch_fidelity" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return False
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return False
    bare = types.ModuleType("torch_fidelity")
    bare.__path__ = list(spec.submodule_search_locations or [])
    bare.__spec__ = spec
    bare.__file__ = spec.origin
    sys.modules["torch_fidelity"] = bare
    return True
