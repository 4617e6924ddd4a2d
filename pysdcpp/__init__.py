"""pysdcpp: Stable Diffusion on the CPU through stable-diffusion.cpp, from Python.

Importing the package loads no native code (the libraries load when a StableDiffusion is created) and nothing of
the API until it is used, so `pysdcpp.format` serves the converters without the runtime.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_EXPORTS = {"StableDiffusion": "api", "GenerationParams": "api", "GenerationResult": "api",
            "PySDCppError": "errors", "ModelLoadError": "errors", "GenerationError": "errors",
            "LibraryNotFoundError": "errors", "StopGeneration": "errors"}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'pysdcpp' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))
