"""A batch's output folder: each job's PNG written atomically under its id, and `manifest.jsonl`, to which only
the driver appends whole lines; what a folder already holds (done jobs, PNGs a killed run wrote but never
recorded, temporary files it left)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

MANIFEST = "manifest.jsonl"
JOB_CHUNK = "pysdcpp-job"  # PNG text chunk holding the job's id
_TMP = ".partial"


def png_name(job_id: str) -> str:
    return f"{job_id}.png"


def job_png(image: Image.Image, parameters: str, job_id: str) -> bytes:
    """The PNG of a job: the A1111 `parameters` chunk and the job's id."""
    from ..api import png_bytes

    return png_bytes(image, parameters, {JOB_CHUNK: job_id})


class OutputFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.manifest = self.path / MANIFEST

    def prepare(self) -> int:
        """Create the folder if needed and remove temporary files a killed run left; returns how many."""
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"output folder {self.path} is a file")
        self.path.mkdir(parents=True, exist_ok=True)
        stale = list(self.path.glob(f".*{_TMP}"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)

    def records(self) -> list[dict]:
        """Every complete manifest line, in order (a line cut short by a kill is ignored)."""
        if not self.manifest.exists():
            return []
        out = []
        for line in self.manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and "id" in rec:
                out.append(rec)
        return out

    def done(self, records: list[dict] | None = None) -> set[str]:
        """Jobs recorded as done whose PNG is still there (`records`: the manifest's, if already read)."""
        records = self.records() if records is None else records
        return {r["id"] for r in records if r.get("status") == "ok" and (self.path / r["file"]).is_file()}

    def unrecorded_png(self, job_id: str) -> bool:
        """A complete PNG of this job that no manifest line records (the run was killed between the two writes)."""
        p = self.path / png_name(job_id)
        if not p.is_file():
            return False
        try:
            with Image.open(p) as im:
                im.load()
                return im.text.get(JOB_CHUNK) == job_id
        except Exception:  # unreadable: not ours to keep; it is regenerated and replaced
            return False

    def write_png(self, job_id: str, data: bytes) -> str:
        """Write a job's PNG atomically (temporary file, fsync, rename); returns its file name."""
        name = png_name(job_id)
        tmp = self.path / f".{name}{_TMP}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / name)
        finally:
            tmp.unlink(missing_ok=True)
        return name

    def append(self, record: dict) -> None:
        """Append one manifest line in one write (after a newline if a killed run cut the last one short)."""
        line = json.dumps(record, sort_keys=True, default=str) + "\n"
        fd = os.open(self.manifest, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size > 0:
                with open(self.manifest, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = "\n" + line
            os.write(fd, line.encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
