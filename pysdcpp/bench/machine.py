"""What every report records and every table ends with: the machine, the native build, the footer line."""

from __future__ import annotations

import os
import platform
import re


def machine_info() -> dict:
    cpu, flags, info = platform.processor() or "", [], {}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        if m := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            cpu = m.group(1).strip()
        for key, field in (("cpu_family", "cpu family"), ("cpu_model", "model")):
            if m := re.search(rf"^{field}\s*:\s*(\d+)$", text, re.M):
                info[key] = int(m.group(1))
        if m := re.search(r"^flags\s*:\s*(.+)$", text, re.M):
            wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile")
            flags = [f for f in m.group(1).split() if f in wanted]
    except OSError:
        pass
    return {"cpu": cpu, **info, "machine": platform.machine(), "logical_cores": os.cpu_count(), "simd": flags,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux /proc; 0 where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")), 0)
    except OSError:
        return 0


def reset_peak_rss() -> bool:
    """Start this process's peak resident memory over from its current size (Linux: clear_refs 5); False where the
    kernel does not let it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def footer(report: dict, what: str) -> str:
    """The line under every table: machine, threads, size, what was measured, date."""
    m = report["machine"]
    return f"{m['cpu']} ({', '.join(m['simd'])}), {report['threads']} threads, {report['size']} px, {what}, " \
        f"{report['date']}"


def build_info() -> dict:
    """The libraries' build flags, and the GEMM register tile the accelerated one runs (layers.gemm_tile_in_use)."""
    from .. import _native
    from ..errors import PySDCppError

    info = dict(_native.build_info())
    try:
        from ..layers import gemm_tile_in_use

        info["gemm_tile"] = gemm_tile_in_use()
    except (PySDCppError, OSError, AttributeError):   # no accelerated library, or one from before the tiles
        pass
    return info


def utc_now() -> str:
    """The date every report records: UTC, to the second."""
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
