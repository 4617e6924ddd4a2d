"""pysdcpp: Stable Diffusion on the CPU through stable-diffusion.cpp, from Python.

Importing the package loads no native code; the libraries load when a StableDiffusion is created.
"""

from .api import GenerationParams, GenerationResult, StableDiffusion
from .errors import GenerationError, LibraryNotFoundError, ModelLoadError, PySDCppError

__version__ = "0.1.0"
__all__ = ["StableDiffusion", "GenerationParams", "GenerationResult", "PySDCppError", "ModelLoadError",
           "GenerationError", "LibraryNotFoundError", "__version__"]
