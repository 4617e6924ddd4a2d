"""Exceptions of pysdcpp: every failure of the native library or of the input surfaces as one of these."""


class PySDCppError(Exception):
    """Base class of pysdcpp's exceptions."""


class LibraryNotFoundError(PySDCppError, ImportError):
    """The native library (or its headers) is not where the package expects it."""


class ModelLoadError(PySDCppError, ValueError):
    """A model file is missing, unreadable, corrupt or of an unsupported architecture."""


class GenerationError(PySDCppError, RuntimeError):
    """The native library failed while computing."""


class StopGeneration(PySDCppError):
    """Raise it from a generation's step callback to stop the run before its next step; generate() raises it
    back, with no image."""
