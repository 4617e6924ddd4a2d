"""Find the pinned stable-diffusion.cpp source tree, and make the patched copy the accelerated build uses.

Run by CMake at configure time (no third-party imports: only the standard library and pip).
Order of sources: an explicit override (PYSDCPP_SDCPP_SOURCE), the initialised `sdcpp/` submodule,
then the registry source distribution that vendors the identical tree (hash-checked, cached).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

UPSTREAM_COMMIT = "90e87bc846f17059771efb8aaa31e9ef0cab6f78"
SDIST_NAME = "stable-diffusion-cpp-python"
SDIST_VERSION = "0.4.7"
SDIST_FILE = "stable_diffusion_cpp_python-0.4.7.tar.gz"
SDIST_SHA256 = "998d1957260dd5ae4e18a8acc0c14b0a8757aaa9f96515197b6d5bbf46df9282"
SDIST_TREE = "stable_diffusion_cpp_python-0.4.7/vendor/stable-diffusion.cpp"


def log(msg: str) -> None:
    print(f"[pysdcpp] {msg}", file=sys.stderr, flush=True)


def default_cache_dir() -> Path:
    env = os.environ.get("PYSDCPP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pysdcpp"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_sdcpp_tree(path: Path) -> bool:
    return (path / "include" / "stable-diffusion.h").is_file() and (path / "ggml" / "CMakeLists.txt").is_file()


def fetch_sdist(cache: Path) -> Path:
    """Download (once) and verify the source distribution; return the unpacked upstream tree."""
    tree = cache / f"sdist-{SDIST_VERSION}" / SDIST_TREE
    if is_sdcpp_tree(tree) and (cache / f"sdist-{SDIST_VERSION}" / ".verified").is_file():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / SDIST_FILE
    if not archive.is_file() or sha256_of(archive) != SDIST_SHA256:
        log(f"downloading {SDIST_NAME}=={SDIST_VERSION} source distribution (20.6 MB) with pip")
        with tempfile.TemporaryDirectory() as tmp:
            # -I: run pip from the base interpreter, outside any build-isolation environment.
            cmd = [sys.executable, "-I", "-m", "pip", "download", "--no-deps",
                   "--no-binary", SDIST_NAME, f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            got = Path(tmp) / SDIST_FILE
            if not got.is_file():
                raise SystemExit(f"pip download failed:\n{proc.stdout}\n"
                                 "Initialise the submodule (git submodule update --init --recursive sdcpp) "
                                 "or set PYSDCPP_SDCPP_SOURCE to a stable-diffusion.cpp checkout at "
                                 f"{UPSTREAM_COMMIT}.")
            shutil.copyfile(got, archive)
    digest = sha256_of(archive)
    if digest != SDIST_SHA256:
        archive.unlink()
        raise SystemExit(f"{SDIST_FILE}: sha256 {digest} does not match the pinned {SDIST_SHA256}; refusing it")
    dest = cache / f"sdist-{SDIST_VERSION}"
    if dest.exists():
        shutil.rmtree(dest)
    log(f"unpacking {archive}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(SDIST_TREE + "/") or m.name == SDIST_TREE]
        for m in members:
            if m.issym() or m.islnk() or ".." in Path(m.name).parts or m.name.startswith("/"):
                raise SystemExit(f"{SDIST_FILE}: unexpected member {m.name!r}")
        tar.extractall(dest, members=members)
    (dest / ".verified").write_text(SDIST_SHA256 + "\n")
    return tree


def git_commit(path: Path) -> str:
    if not shutil.which("git"):
        return "unknown"
    proc = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "unknown"


def find_source(repo: Path, cache: Path) -> tuple[Path, str]:
    """The pristine tree and its upstream commit."""
    override = os.environ.get("PYSDCPP_SDCPP_SOURCE")
    if override:
        path = Path(override).resolve()
        if not is_sdcpp_tree(path):
            raise SystemExit(f"PYSDCPP_SDCPP_SOURCE={override} is not a stable-diffusion.cpp tree with ggml")
        return path, git_commit(path)
    sub = repo / "sdcpp"
    if is_sdcpp_tree(sub):
        return sub.resolve(), git_commit(sub)
    # The source distribution was checked file by file against the pinned commit.
    return fetch_sdist(cache), UPSTREAM_COMMIT


def patch_fingerprint(patches: list[Path], source: Path) -> str:
    h = hashlib.sha256(str(source).encode())
    for p in patches:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def apply_patch(patch: Path, tree: Path) -> None:
    if shutil.which("git"):
        cmd = ["git", "apply", "--whitespace=nowarn", str(patch)]
    elif shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "-i", str(patch)]
    else:
        raise SystemExit("applying the patch series needs git or patch on PATH")
    # Inside another git work tree (a build folder in a clone), git apply would take the patch's paths as relative to
    # that tree's root and silently skip what lies outside `tree`: keep git from looking above it.
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
    proc = subprocess.run(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"patch {patch.name} does not apply:\n{proc.stdout}")


def sync_tree(src: Path, dest: Path) -> int:
    """Make `dest` hold exactly `src`'s files, rewriting only those whose bytes differ (their times change,
    the others' stay, so the build recompiles only what a patch touched). Returns the number rewritten."""
    changed = 0
    wanted = set()
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        wanted.add(rel)
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if target.is_file() and target.stat().st_size == path.stat().st_size and \
                target.read_bytes() == path.read_bytes():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)  # a fresh mtime: the build must see the change
        shutil.copymode(path, target)
        changed += 1
    for path in sorted(dest.rglob("*"), reverse=True):
        rel = path.relative_to(dest)
        if rel not in wanted and rel.name != STAMP:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    return changed


STAMP = ".pysdcpp-patched"


def make_patched_copy(source: Path, patches: list[Path], dest: Path) -> None:
    """The pristine tree plus the patch series, in `dest`; redone only when the inputs changed."""
    stamp = dest / STAMP
    fingerprint = patch_fingerprint(patches, source)
    if stamp.is_file() and stamp.read_text().strip() == fingerprint:
        return
    log(f"preparing {dest}: {source} + {len(patches)} patch(es)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        work = Path(tmp) / "tree"
        shutil.copytree(source, work, symlinks=True, ignore=shutil.ignore_patterns(".git"))
        for p in patches:
            apply_patch(p, work)
        n = sync_tree(work, dest)
    log(f"{n} file(s) changed in the patched tree")
    stamp.write_text(fingerprint + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repo", type=Path, required=True, help="pysdcpp repository root")
    ap.add_argument("--patched-dest", type=Path, required=True, help="where the patched copy goes")
    ap.add_argument("--patches", type=Path, nargs="*", default=[])
    args = ap.parse_args()
    source, commit = find_source(args.repo, default_cache_dir())
    make_patched_copy(source, sorted(args.patches), args.patched_dest)
    # CMake reads "pristine source;commit" (a CMake list) from stdout.
    print(f"{source};{commit}")


if __name__ == "__main__":
    main()
