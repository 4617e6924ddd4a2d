"""The one door from the runtime to the converters (`pysdcpp convert`, `inspect` of a checkpoint, `--demo`),
opened lazily: generating never imports them. Installed, they are the subpackage `pysdcpp.converters`; in a source
checkout (PYTHONPATH=.) the `converters/` folder beside this package is loaded under that name."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "pysdcpp.converters"


def converters():
    """The converter package (imported on first use)."""
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    root = Path(__file__).resolve().parent.parent
    source = root / "converters" / "__init__.py"
    if (root / "pyproject.toml").is_file() and (root / "converters" / "sd_layout.py").is_file():
        # a source checkout: its own converters, not an installed copy of another version
        spec = importlib.util.spec_from_file_location(PACKAGE, source, submodule_search_locations=[str(source.parent)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[PACKAGE]
            raise
        setattr(sys.modules[__package__], "converters", module)   # as an import of the subpackage would
        return module
    return importlib.import_module(PACKAGE)


def submodule(name: str):
    """A converter module by its short name ("synthetic", "sd_layout", "gguf_out", "alter")."""
    converters()
    return importlib.import_module(f"{PACKAGE}.{name}")
