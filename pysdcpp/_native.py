"""cffi (ABI mode) binding to the two native libraries: `upstream` (pristine) and `accelerated` (patched).

Declarations come from the headers installed beside the libraries (upstream's stable-diffusion.h and our
pysdcpp_ext.h), read at import time: there are no hand-copied struct layouts to drift out of date.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import cffi

from .errors import LibraryNotFoundError

BACKENDS = ("accelerated", "upstream")
LIB_FILE = "libstable-diffusion.so"
_log = logging.getLogger("pysdcpp.native")


def lib_dir_candidates() -> list[Path]:
    """Where built libraries may live, in order: $PYSDCPP_LIB_DIR; pysdcpp/_libs inside this package; when this
    package is a source checkout, the installed distribution's _libs (after `pip install .`) and the checkout's
    build/stage (the README's kernel-work build)."""
    env = os.environ.get("PYSDCPP_LIB_DIR")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent
    out = [here / "_libs"]
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        installed = Path(distribution("pysdcpp").locate_file("pysdcpp/_libs")).resolve()
        if installed != out[0]:
            out.append(installed)
    except (ImportError, PackageNotFoundError):
        pass
    out.append(here.parent / "build" / "stage" / "pysdcpp" / "_libs")
    return out


def lib_dir() -> Path:
    """The first candidate folder that holds the headers the binding reads (else the first candidate)."""
    candidates = lib_dir_candidates()
    return next((d for d in candidates if (d / "stable-diffusion.h").is_file()), candidates[0])


def header_declarations(text: str) -> str:
    """Turn a C header into cffi declarations: drop preprocessor lines, C++-only blocks and SD_API."""
    out = []
    skip_depth = 0
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            directive = stripped[1:].strip()
            if directive.startswith(("if", "ifdef", "ifndef")):
                depth += 1
                if skip_depth == 0 and "__cplusplus" in directive:
                    skip_depth = depth
            elif directive.startswith("endif"):
                if skip_depth == depth:
                    skip_depth = 0
                depth -= 1
            elif directive.startswith("else") and skip_depth == depth and depth:
                skip_depth = 0
            continue
        if skip_depth:
            continue
        line = re.sub(r"//.*", "", line)
        out.append(line.replace("SD_API ", ""))
    return "\n".join(out)


_ffi = None
_ffi_lock = threading.Lock()


def ffi() -> cffi.FFI:
    global _ffi
    with _ffi_lock:
        if _ffi is None:
            d = lib_dir()
            missing = [p for p in (d / "stable-diffusion.h", d / "pysdcpp_ext.h") if not p.is_file()]
            if missing:
                looked = ", ".join(str(c) for c in lib_dir_candidates())
                raise LibraryNotFoundError(f"pysdcpp's native build is missing ({missing[0].name} not found; looked in "
                                           f"{looked}). Run `pip install .` in the source checkout, or point "
                                           "PYSDCPP_LIB_DIR at a build's _libs folder.")
            f = cffi.FFI()
            f.cdef(header_declarations((d / "stable-diffusion.h").read_text()))
            f.cdef(header_declarations((d / "pysdcpp_ext.h").read_text()))
            f.cdef("void free(void *ptr);")  # images returned by generate_image are released with C free
            _ffi = f
        return _ffi


class NativeLibrary:
    """One loaded library, with its process-global log callback routed to Python logging."""

    def __init__(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        path = lib_dir() / backend / LIB_FILE
        if not path.is_file():
            raise LibraryNotFoundError(f"the {backend} library was not built ({path} not found)")
        self.backend = backend
        self.path = path
        self.ffi = ffi()
        self.lib = self.ffi.dlopen(str(path))
        self.logger = logging.getLogger(f"pysdcpp.native.{backend}")
        self.last_error_lines: list[str] = []
        self._captures: list[list[str]] = []  # info lines collected for a caller (capture())
        self._progress = None
        self._preview = None
        self._stop: BaseException | None = None  # what stopped the running generation (arm_stop)
        self._armed = False
        self._log_cb = self.ffi.callback("sd_log_cb_t", self._on_log, onerror=self._on_callback_error)
        self._progress_cb = self.ffi.callback("sd_progress_cb_t", self._on_progress, onerror=self._on_callback_error)
        self.lib.sd_set_log_callback(self._log_cb, self.ffi.NULL)
        self.lib.sd_set_progress_callback(self._progress_cb, self.ffi.NULL)
        self._preview_cb = self.ffi.callback("sd_preview_cb_t", self._on_preview, onerror=self._on_callback_error)
        self.lock = threading.RLock()  # the library's callbacks and contexts are not thread-safe

    def _on_log(self, level, text, _data):
        try:
            msg = self.ffi.string(text).decode("utf-8", "replace").rstrip()
        except Exception:  # never let an exception cross into C
            return
        py_level = {0: logging.DEBUG, 1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR}.get(int(level),
                                                                                             logging.INFO)
        if self._stop is not None and py_level > logging.INFO:
            py_level = logging.INFO   # a stopped run's failure messages are the stop, not an error
        if py_level >= logging.ERROR:
            self.last_error_lines.append(msg)
            del self.last_error_lines[:-20]
        try:
            if py_level >= logging.INFO:
                for lines in self._captures:
                    lines.append(msg)
            self.logger.log(py_level, "%s", msg)
        except BaseException as e:  # a Ctrl-C delivered while the library logs
            if self._armed:
                self._request_stop(e)

    def _on_progress(self, step, steps, seconds, _data):
        cb = self._progress
        if cb is not None:
            try:
                cb(int(step), int(steps), float(seconds))
            except BaseException as e:  # never let an exception cross into C
                if self._armed:
                    self._request_stop(e)
                else:
                    _log.exception("progress callback failed")

    def _on_preview(self, step, frame_count, frames, is_noisy, _data):
        fn = self._preview
        if fn is None or frame_count < 1:
            return
        try:
            fn(int(step), copy_image(self.ffi, frames[0]), bool(is_noisy))
        except BaseException as e:  # never let an exception cross into C
            if self._armed:
                self._request_stop(e)
            else:
                _log.exception("preview callback failed")

    def set_preview(self, fn, mode: str = "proj", interval: int = 1, noisy: bool = False) -> None:
        """Route the library's latent previews (process-global, as its other callbacks) to fn(step, image,
        is_noisy), or stop them with fn=None."""
        self._preview = fn
        if fn is None:
            self.lib.sd_set_preview_callback(self.ffi.NULL, self.lib.PREVIEW_NONE, 1, True, False, self.ffi.NULL)
        else:
            self.lib.sd_set_preview_callback(self._preview_cb, self.lib.str_to_preview(mode.encode()), int(interval),
                                             not noisy, bool(noisy), self.ffi.NULL)

    def _on_callback_error(self, exc_type, exc, tb):
        """cffi's last resort for an exception escaping a callback (a KeyboardInterrupt delivered inside one)."""
        if self._armed and exc is not None:
            self._request_stop(exc)
        elif exc_type is not None and not issubclass(exc_type, KeyboardInterrupt):
            _log.error("native callback failed: %s", exc)

    def _request_stop(self, exc: BaseException) -> None:
        if self._stop is None:
            self._stop = exc
            if self.has_components:
                self.lib.pysdcpp_cancel(1)   # the sampler stops before its next step

    def set_progress(self, fn):
        self._progress = fn

    def arm_stop(self) -> None:
        """Before a generation: an exception in the progress callback (or a Ctrl-C arriving in any callback) stops
        it; disarm_stop() afterwards hands that exception back."""
        self._stop = None
        self._armed = True
        if self.has_components:
            self.lib.pysdcpp_cancel(0)

    def disarm_stop(self) -> BaseException | None:
        self._armed = False
        stop, self._stop = self._stop, None
        if self.has_components:
            self.lib.pysdcpp_cancel(0)
        return stop

    @contextlib.contextmanager
    def capture(self):
        """The library's info (and higher) log lines while the block runs, as a list."""
        lines: list[str] = []
        self._captures.append(lines)
        try:
            yield lines
        finally:
            self._captures.remove(lines)

    def take_errors(self) -> str:
        msg = "; ".join(self.last_error_lines[-3:])
        self.last_error_lines.clear()
        return msg

    @property
    def has_components(self) -> bool:
        try:
            self.lib.pysdcpp_api_version
        except AttributeError:
            return False
        return True

    def version(self) -> str:
        return self.ffi.string(self.lib.sd_version()).decode()

    def commit(self) -> str:
        return self.ffi.string(self.lib.sd_commit()).decode()

    def system_info(self) -> str:
        return self.ffi.string(self.lib.sd_get_system_info()).decode()

    def enum_names(self, name_fn: str, count: int) -> list[str]:
        fn = getattr(self.lib, name_fn)
        return [self.ffi.string(fn(i)).decode() for i in range(count)]


_libc = None


def copy_image(ffi, img):
    """A PIL copy of a library image (sd_image_t: 8-bit, 1, 3 or 4 channels); its buffer stays the library's."""
    import numpy as np
    from PIL import Image

    w, h, c = int(img.width), int(img.height), int(img.channel)
    arr = np.frombuffer(ffi.buffer(img.data, w * h * c), dtype=np.uint8).reshape(h, w, c).copy()
    if c == 1:
        return Image.fromarray(arr[:, :, 0], "L")
    return Image.fromarray(arr, "RGB" if c == 3 else "RGBA")


def libc():
    """The C library, for `free` on buffers the native library hands over."""
    global _libc
    if _libc is None:
        _libc = ffi().dlopen(None)
    return _libc


_libraries: dict[str, NativeLibrary] = {}
_libraries_lock = threading.Lock()


def load(backend: str) -> NativeLibrary:
    with _libraries_lock:
        if backend not in _libraries:
            _libraries[backend] = NativeLibrary(backend)
        return _libraries[backend]


def available_backends() -> list[str]:
    return [b for b in BACKENDS if (lib_dir() / b / LIB_FILE).is_file()]


def build_info() -> dict:
    p = lib_dir() / "build_info.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def upstream_cli() -> Path | None:
    p = lib_dir() / "upstream" / "sd-cli"
    return p if p.is_file() else None
