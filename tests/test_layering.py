"""The house rules, checked on the installed package: generating imports no converter module, the format layer
loads without the runtime, no top-level `converters` package is installed, and a source checkout finds the
installed native libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path, *args: str) -> dict:
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_generating_imports_no_converter_module(sd15_f16, tmp_path):
    code = """
import json, sys
import pysdcpp
with pysdcpp.StableDiffusion(sys.argv[1], threads=2) as sd:
    image = sd.generate("x", width=64, height=64, num_inference_steps=1)[0]
print(json.dumps({"modules": sorted(m for m in sys.modules if "converters" in m), "size": list(image.size),
                  "package": pysdcpp.__file__}))
"""
    out = _run(code, tmp_path, str(sd15_f16))   # run outside the checkout: the installed package
    assert out["size"] == [64, 64]
    assert out["modules"] == []
    assert str(REPO) not in out["package"]


def test_format_layer_loads_without_the_runtime(tmp_path):
    code = """
import json, sys
import pysdcpp.format.routing, pysdcpp.format.macs, pysdcpp.format.checkpoint_io
print(json.dumps(sorted(m for m in sys.modules if m.startswith("pysdcpp") and not m.startswith("pysdcpp.format"))))
"""
    assert _run(code, tmp_path) == ["pysdcpp"]   # the package's lazy __init__ only: no api, no cffi binding


def test_no_top_level_converters_package_is_installed(tmp_path):
    code = """
import importlib.util, json
print(json.dumps([importlib.util.find_spec("converters") is None,
                  importlib.util.find_spec("pysdcpp.converters") is not None]))
"""
    assert _run(code, tmp_path) == [True, True]


def test_a_source_checkout_finds_the_installed_libraries():
    code = """
import json, pysdcpp
from pysdcpp import _native
print(json.dumps({"package": pysdcpp.__file__, "backends": _native.available_backends(),
                  "lib": str(_native.lib_dir())}))
"""
    out = _run(code, REPO)   # `python -c` in the checkout imports the source tree, which has no _libs of its own
    assert out["package"].startswith(str(REPO))
    assert set(out["backends"]) == {"accelerated", "upstream"}
    assert not out["lib"].startswith(str(REPO / "pysdcpp"))
