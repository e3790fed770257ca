"""llama.cpp's own ``llama-server``, built from the llama.cpp that llama-cpp-python vendors.

``python -m tests.bench.llama_server`` (run by ``make bench``) makes sure the
binary exists and prints its path. It downloads the sdist of the *installed*
llama-cpp-python version from the package index, extracts its
``vendor/llama.cpp``, and cmake-builds only the ``llama-server`` target: CPU,
Release, static, no web UI, no network at build time, the same ggml defaults
as llama-cpp-python's own build (``GGML_NATIVE``, OpenMP) and the same
``CMAKE_ARGS``. So the peer runs exactly the kernels our worker runs, and
only the serving layer differs.

The binary is cached in the virtualenv, keyed by that version:
``<venv>/llama-server/<version>/llama-server``; a new llama-cpp-python builds
a new one. A build takes about ten minutes on two cores and prints one line per
step; the whole compiler output goes to ``<venv>/llama-server/<version>/build.log``.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

PACKAGE = "llama-cpp-python"
TARGET = "llama-server"
#: CMake options of the vendored llama.cpp: CPU, static, only what the server needs, nothing
#: fetched at build time (the web UI would otherwise be downloaded from Hugging Face). Options an
#: older llama.cpp lacks are only warned about; LLAMA_CURL is for those older ones.
CMAKE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "LLAMA_BUILD_COMMON": "ON",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_APP": "OFF",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
    "GGML_CUDA": "OFF",
}
#: Parts of the vendored tree the build never reads (test vocabularies, documentation): not extracted.
SKIP_DIRS = ("models", "docs", "media", "gguf-py", "tests")
#: ``[12/180] Building CXX object …/foo.cpp.o`` from Ninja, ``[ 12%] Building …`` from Make.
STEP = re.compile(r"^\[\s*(\d+(?:/\d+|%))\]\s+(.*)$")


def log(text: str) -> None:
    print(text, flush=True)


def installed_version() -> str:
    """The version of the llama-cpp-python this interpreter imports."""
    return importlib.metadata.version(PACKAGE)


def cache_dir(version: str, root: Path | None = None) -> Path:
    """Where the binary of ``version`` lives: under the running virtualenv unless ``root`` says."""
    return (root or Path(sys.prefix) / TARGET) / version


def binary_path(version: str | None = None, root: Path | None = None) -> Path:
    return cache_dir(version or installed_version(), root) / TARGET


def ensure(version: str | None = None, root: Path | None = None, jobs: int | None = None,
           sdist: Path | None = None) -> Path:
    """The path of a built ``llama-server`` for ``version``; builds it the first time."""
    version = version or installed_version()
    path = binary_path(version, root)
    if path.exists():
        return path
    where = cache_dir(version, root)
    where.mkdir(parents=True, exist_ok=True)
    with open(where / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second run waits for the first one's build, then takes its binary
        if not path.exists():
            _build_into(path, version, jobs, sdist)
    return path


def _build_into(path: Path, version: str, jobs: int | None, sdist: Path | None) -> None:
    where = path.parent
    started = time.monotonic()
    log(f"==> building {TARGET} from the llama.cpp vendored by {PACKAGE} {version} "
        f"(once; ~10 min on two cores; log: {where / 'build.log'})")
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp:
        work = Path(tmp)
        source = extract(sdist or download(version, work), work)
        built = build(source, work / "build", where / "build.log", jobs)
        partial = where / (TARGET + ".partial")
        shutil.copy2(built, partial)
        partial.rename(path)  # atomic: a half-copied binary is never taken for a built one
    log(f"    built {path} in {time.monotonic() - started:.0f}s")


def download(version: str, into: Path) -> Path:
    """The sdist of ``version`` from the package index (pip's cache serves a repeat)."""
    log(f"    downloading the {PACKAGE} {version} sdist")
    argv = [sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps",
            "--dest", str(into), f"{PACKAGE}=={version}"]
    done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"could not download the {PACKAGE} {version} sdist:\n{done.stdout[-3000:]}")
    found = sorted(into.glob("llama_cpp_python-*.tar.gz")) + sorted(into.glob("llama-cpp-python-*.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no sdist in {into}")
    return found[0]


def extract(sdist: Path, into: Path) -> Path:
    """Extract only ``vendor/llama.cpp`` (less what the build never reads); returns its directory."""
    log(f"    extracting vendor/llama.cpp from {sdist.name}")
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 3 and parts[1:3] == ("vendor", "llama.cpp"):
                if len(parts) > 4 and parts[3] in SKIP_DIRS:
                    continue
                members.append(member)
        if not members:
            raise SystemExit(f"{sdist.name} vendors no llama.cpp")
        tar.extractall(into, members=members, filter="data")
    return into / Path(members[0].name).parts[0] / "vendor" / "llama.cpp"


def _tool_path() -> str:
    """PATH with this virtualenv's ``bin`` first: the bench extra installs cmake and ninja there."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def build(source: Path, build_dir: Path, log_path: Path, jobs: int | None) -> Path:
    """Configure and build the one target; returns the built binary."""
    generator = ["-G", "Ninja"] if shutil.which("ninja", path=_tool_path()) else []
    configure = ["cmake", "-S", str(source), "-B", str(build_dir), *generator,
                 *(f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()),
                 # The flags llama-cpp-python was built with (the Makefile leaves AMX out on x86_64).
                 *shlex.split(os.environ.get("CMAKE_ARGS", ""))]
    jobs = jobs or int(os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or 0) or os.cpu_count() or 1
    compile_ = ["cmake", "--build", str(build_dir), "--target", TARGET, "--parallel", str(jobs)]
    with open(log_path, "w") as out:
        log("    configuring (cmake " + " ".join(f"-D{k}={v}" for k, v in CMAKE_OPTIONS.items()) + ")")
        _run(configure, out, log_path, progress=False)
        log(f"    compiling with {jobs} job(s)")
        _run(compile_, out, log_path, progress=True)
    built = build_dir / "bin" / TARGET
    if not built.exists():
        raise SystemExit(f"the build finished without {built}; see {log_path}")
    return built


def _run(argv: list[str], out: object, log_path: Path, progress: bool) -> None:
    """Run a build step, the whole output to the log, one line per compile step to the console."""
    print("$ " + " ".join(argv), file=out, flush=True)  # type: ignore[call-overload]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=dict(os.environ, PATH=_tool_path()))
    assert proc.stdout is not None
    for line in proc.stdout:
        out.write(line)  # type: ignore[attr-defined]
        step = STEP.match(line.strip())
        if progress and step:
            words = step.group(2).split()
            what = Path(words[-1]).name.removesuffix(".o") if words else ""
            log(f"    compiling llama-server [{step.group(1)}] {what}")
        elif re.search(r"error:|CMake Error|FAILED:", line):
            log("    " + line.rstrip())
    if proc.wait() != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-40:]
        raise SystemExit(f"{argv[0]} {argv[1]} failed; the last lines of {log_path}:\n" + "\n".join(tail))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.llama_server", description=__doc__.split("\n\n")[0])
    p.add_argument("--package-version", help=f"{PACKAGE} version whose llama.cpp to build (default: the installed one)")
    p.add_argument("--root", type=Path, help=f"cache root (default: <venv>/{TARGET})")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: CMAKE_BUILD_PARALLEL_LEVEL or cores)")
    p.add_argument("--sdist", type=Path, help="a downloaded sdist to build from instead of downloading one")
    args = p.parse_args(argv)
    version = args.package_version or installed_version()
    if binary_path(version, args.root).exists():
        log(f"==> {TARGET} for {PACKAGE} {version}: {binary_path(version, args.root)}")
        return
    ensure(version, args.root, args.jobs, args.sdist)


if __name__ == "__main__":
    main()
