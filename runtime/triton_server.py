"""Running the real ``tritonserver`` on 127.0.0.1 for a model repository (``echostream serve``, the
tests and the bench use this).

Where the server comes from: ``--tritonserver PATH``, else ``$ECHOSTREAM_TRITONSERVER``, else
``tritonserver`` on ``PATH`` (an NGC container), else the server bundled in the ``nvidia-pytriton``
wheel (``pip install --no-deps nvidia-pytriton``: a real ``tritonserver`` with the Python backend
only, CPU capable, and Python-backend stubs built for Python 3.8 to 3.13).

The Python backend runs each model instance in a *stub* process: a small executable that embeds a
Python interpreter. Two things must agree for the model to run:

1. **libpython**: the stub is linked against ``libpython3.X.so.1.0`` and finds it by the library
   search path, i.e. whatever ``libpython3.X`` the system has, not necessarily the interpreter that
   has echostream installed. The stub of the model environment's version ``3.X`` is used, the
   directory of that interpreter's own ``libpython`` goes first on ``LD_LIBRARY_PATH`` and that
   interpreter's ``bin`` folder first on ``PATH`` (an embedded interpreter started without a
   program name looks for ``python3`` on ``PATH`` to find its prefix, which is how it picks up a
   virtual environment's ``pyvenv.cfg`` and site-packages).
2. **NumPy**: the stub's tensor bindings (pybind11) are built against NumPy 1.x. Under NumPy 2
   its input tensors read as zeros and its outputs come back empty (measured with the bundled
   stub of nvidia-pytriton 0.7.0; it is why that wheel pins ``numpy<2``). The model's Python must
   have NumPy < 2.

The *model environment* is the Python the stub runs: ``--model-env DIR``, else
``$ECHOSTREAM_MODEL_ENV``, else this interpreter when its NumPy is < 2, else the environment made
once by ``echostream serve --setup-model-env``: a virtual environment of this interpreter's
version holding only ``numpy<2``, layered over this environment's site-packages (a ``.pth`` adds
them after its own), so the stub runs exactly the echostream and ONNX Runtime installed here.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from echostream.errors import BackendUnavailable, EchoStreamError

HOST = "127.0.0.1"
STUB = "triton_python_backend_stub"
PYTRITON_INSTALL = "pip install --no-deps nvidia-pytriton  (its bundled tritonserver; or run in an NGC Triton container)"
NUMPY_PIN = "numpy<2"


class ServeError(EchoStreamError):
    """The server could not be started, or the model did not load."""


# ---- the server binary -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerBinary:
    """A ``tritonserver`` executable and what it needs around it."""

    path: Path
    source: str  # "PATH", "--tritonserver", "nvidia-pytriton 0.7.0", ...
    python_backend: Path | None = None  # bundled: the folder with libtriton_python.so
    stubs: Path | None = None  # bundled: python_backend_stubs/<3.X>/triton_python_backend_stub
    lib_dirs: tuple[Path, ...] = ()

    def stub_for(self, version: str) -> Path | None:
        if self.stubs is None:
            return None
        stub = self.stubs / version / STUB
        return stub if stub.is_file() else None

    def stub_versions(self) -> list[str]:
        if self.stubs is None:
            return []
        return sorted((p.parent.name for p in self.stubs.glob(f"*/{STUB}")),
                      key=lambda v: tuple(int(x) for x in v.split(".")))


def find_tritonserver(explicit: str | os.PathLike | None = None) -> ServerBinary:
    """The server to run (see the module doc for the order). Raises ``BackendUnavailable``."""
    if explicit is None and os.environ.get("ECHOSTREAM_TRITONSERVER"):
        explicit = os.environ["ECHOSTREAM_TRITONSERVER"]
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise BackendUnavailable(f"tritonserver {path}: not an executable file")
        return _bundled_or_plain(path, "--tritonserver")
    found = shutil.which("tritonserver")
    if found:
        return _bundled_or_plain(Path(found), "PATH")
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        if (root / "bin" / "tritonserver").is_file():
            return _bundled_or_plain(root / "bin" / "tritonserver", "nvidia-pytriton")
    raise BackendUnavailable(f"no tritonserver found (not on PATH, no nvidia-pytriton wheel); "
                             f"install one: {PYTRITON_INSTALL}")


def _bundled_or_plain(path: Path, source: str) -> ServerBinary:
    real = path.resolve()
    root = real.parent.parent  # .../tritonserver/{bin,backends,python_backend_stubs}
    stubs = root / "python_backend_stubs"
    if stubs.is_dir() and (root / "backends" / "python" / "libtriton_python.so").is_file():
        libs = root.parent.parent / "nvidia_pytriton.libs"
        version = _dist_version("nvidia-pytriton")
        return ServerBinary(real, f"nvidia-pytriton {version}" if version else source,
                            root / "backends" / "python", stubs,
                            (libs,) if libs.is_dir() else ())
    return ServerBinary(real, source)


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ---- the model environment ---------------------------------------------------------------------

_PROBE = r"""
import json, sys, sysconfig
out = {"version": "%d.%d" % sys.version_info[:2], "full_version": sys.version.split()[0],
       "prefix": sys.prefix, "executable": sys.executable,
       "shared": bool(sysconfig.get_config_var("Py_ENABLE_SHARED")),
       "libdir": sysconfig.get_config_var("LIBDIR"),
       "soname": sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")}
try:
    import numpy
    out["numpy"] = numpy.__version__
except Exception as exc:
    out["numpy_error"] = "%s: %s" % (type(exc).__name__, exc)
try:
    import echostream.runtime.triton_model as m
    out["echostream"] = m.__file__
except Exception as exc:
    out["echostream_error"] = "%s: %s" % (type(exc).__name__, exc)
print(json.dumps(out))
"""


@dataclass(frozen=True)
class ModelPython:
    """The Python the Python-backend stub runs (see the module doc)."""

    executable: Path
    bin_dir: Path  # goes first on PATH: holds the ``python3`` that resolves to ``executable``
    version: str  # "3.11"
    full_version: str
    prefix: str
    numpy: str
    libdir: Path | None  # folder of the interpreter's own libpython (None: static interpreter)
    echostream: str

    def describe(self) -> str:
        return (f"Python {self.full_version} at {self.prefix} (NumPy {self.numpy}, "
                f"echostream {Path(self.echostream).parent.parent})")


def default_model_env() -> Path:
    """Where ``--setup-model-env`` puts the model environment of this interpreter's environment
    (``$ECHOSTREAM_MODEL_ENV`` overrides)."""
    if os.environ.get("ECHOSTREAM_MODEL_ENV"):
        return Path(os.environ["ECHOSTREAM_MODEL_ENV"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(str(Path(sys.prefix).resolve()).encode()).hexdigest()[:12]
    return Path(base) / "echostream" / "triton-model-env" / \
        f"py{sys.version_info[0]}.{sys.version_info[1]}-{key}"


def probe_python(executable: Path, timeout_s: float = 120.0) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    try:
        out = subprocess.run([str(executable), "-c", _PROBE], capture_output=True, text=True,
                             timeout=timeout_s, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServeError(f"model environment {executable}: cannot run it: {exc}") from None
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ServeError(f"model environment {executable}: probe failed: {tail}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def model_python(executable: str | os.PathLike, binary: ServerBinary | None = None) -> ModelPython:
    """Check an interpreter as the stub's Python: NumPy < 2, echostream importable, a stub of its
    version (bundled server), its libpython located. Raises ``ServeError`` naming what is wrong."""
    executable = Path(executable)
    info = probe_python(executable)
    where = f"model environment {info['prefix']} (Python {info['full_version']})"
    if "numpy" not in info:
        raise ServeError(f"{where}: NumPy does not import ({info.get('numpy_error')}); it needs "
                         f"{NUMPY_PIN}")
    # Measured with the bundled stubs; another server's stub (an NGC container) may be built
    # otherwise, and the instance's log line says what it got.
    bundled = binary is None or binary.stubs is not None
    if bundled and int(info["numpy"].split(".")[0]) >= 2:
        raise ServeError(
            f"{where} has NumPy {info['numpy']}: the Python-backend stub is built against NumPy 1.x "
            f"(under NumPy 2 its inputs read as zeros and its outputs come back empty); make a "
            f"model environment once with `echostream serve --setup-model-env` (or pass "
            f"--model-env DIR of a Python with {NUMPY_PIN} and echostream)")
    if "echostream" not in info:
        raise ServeError(f"{where}: echostream does not import there ({info.get('echostream_error')})")
    if binary is not None and binary.stubs is not None and binary.stub_for(info["version"]) is None:
        raise ServeError(f"{where}: {binary.source} has Python-backend stubs for "
                         f"{', '.join(binary.stub_versions())} only")
    libdir = None
    if info["shared"] and info["libdir"] and (Path(info["libdir"]) / info["soname"]).exists():
        libdir = Path(info["libdir"])
    bin_dir = executable.parent
    if not (bin_dir / "python3").exists():
        raise ServeError(f"{where}: {bin_dir} has no 'python3' (the stub finds its prefix through "
                         "it); pass --model-env a virtual environment")
    return ModelPython(executable, bin_dir, info["version"], info["full_version"], info["prefix"],
                       info["numpy"], libdir, info["echostream"])


def resolve_model_env(model_env: str | os.PathLike | None,
                      binary: ServerBinary | None = None) -> ModelPython:
    """The model environment to use (see the module doc for the order)."""
    if model_env is None and os.environ.get("ECHOSTREAM_MODEL_ENV"):
        model_env = os.environ["ECHOSTREAM_MODEL_ENV"]
    if model_env is not None:
        path = Path(model_env)
        exe = path if path.is_file() else path / "bin" / "python"
        if not exe.exists():
            raise ServeError(f"--model-env {path}: no Python there (expected {exe})")
        return model_python(exe, binary)
    import numpy

    if int(numpy.__version__.split(".")[0]) < 2 or (binary is not None and binary.stubs is None):
        return model_python(Path(sys.executable), binary)
    default = default_model_env()
    if (default / "bin" / "python").exists():
        return model_python(default / "bin" / "python", binary)
    raise ServeError(
        f"this Python has NumPy {numpy.__version__}, but the Python-backend stub is built against "
        f"NumPy 1.x (under NumPy 2 its tensors come back empty); make the model environment once "
        f"with `echostream serve --setup-model-env` (a {NUMPY_PIN} layer over this environment, in "
        f"{default}), or pass --model-env DIR")


def setup_model_env(path: str | os.PathLike | None = None,
                    log: Callable[[str], None] = print) -> ModelPython:
    """Create the layered model environment (see the module doc); pip fetches ``numpy<2``."""
    import site
    import sysconfig

    path = Path(path) if path is not None else default_model_env()
    if path.exists():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating the model environment {path} (Python {sys.version.split()[0]} + {NUMPY_PIN}, "
        f"layered over {sys.prefix})")
    _run([sys.executable, "-m", "venv", str(path)])
    python = path / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", NUMPY_PIN])
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    dirs = [d for d in site.getsitepackages() if Path(d).is_dir()]
    if site.ENABLE_USER_SITE and Path(site.getusersitepackages()).is_dir():
        dirs.append(site.getusersitepackages())
    dirs += [p for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])
             if p not in dirs and Path(p).is_dir()]
    # Processed after the environment's own site-packages is on sys.path: its numpy<2 wins; the
    # other packages (echostream, onnxruntime, ...) are this environment's.
    lines = [f"import site; site.addsitedir({d!r})" for d in dirs]
    (purelib / "zz-echostream-serving-env.pth").write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = model_python(python)
    log(f"model environment ready: {env.describe()}")
    return env


def _run(cmd: list[str]) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines() or ["?"])[-1]
        raise ServeError(f"{' '.join(cmd[:4])} ... failed: {tail}")


# ---- the server process -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except Exception:
        pass


@dataclass
class TritonServer:
    """``tritonserver`` for one model repository, every endpoint on 127.0.0.1.

    ``start()`` returns once the model is ready (or raises :class:`ServeError` with the model's
    failure line from the server log); ``stop()`` stops it (SIGTERM, then SIGKILL to its process
    group after ``exit_timeout_s`` + 5 s). The server's output goes to ``log_path`` (and to
    ``echo``, a text stream, when given) and its last lines stay in ``tail``.
    """

    repo: Path
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    binary: ServerBinary | None = None
    model_env: ModelPython | None = None
    log_path: Path | None = None
    echo: TextIO | None = None
    exit_timeout_s: int = 5
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen | None = field(default=None, init=False)
    tail: deque = field(default_factory=lambda: deque(maxlen=2000), init=False)
    _scratch: Path | None = field(default=None, init=False)
    _reader: threading.Thread | None = field(default=None, init=False)

    @property
    def grpc_url(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{HOST}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        cmd = [str(self.binary.path), "--model-repository", str(Path(self.repo).resolve()),
               "--http-address", HOST, "--grpc-address", HOST, "--metrics-address", HOST,
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
               "--metrics-port", str(self.metrics_port), "--allow-gpu-metrics", "false",
               "--exit-timeout-secs", str(self.exit_timeout_s), "--disable-auto-complete-config",
               "--strict-readiness", "true"]
        if self._scratch is not None:
            cmd += ["--backend-directory", str(self._scratch / "backends")]
        return cmd + list(self.extra_args)

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)  # the stub's sys.path is the model environment's
        env.pop("PYTHONHOME", None)
        env["PATH"] = f"{self.model_env.bin_dir}{os.pathsep}{env.get('PATH', '')}"
        libs = ([str(self.model_env.libdir)] if self.model_env.libdir else []) + \
            [str(p) for p in self.binary.lib_dirs]
        if env.get("LD_LIBRARY_PATH"):
            libs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs)
        return env

    def start(self, ready_timeout_s: float = 300.0) -> "TritonServer":
        repo = Path(self.repo)
        if not (repo / "echostream" / "config.pbtxt").is_file():
            raise ServeError(f"{repo}: not a model repository written by `echostream triton-repo` "
                             "(no echostream/config.pbtxt)")
        if self.binary is None:
            self.binary = find_tritonserver()
        if self.model_env is None:
            self.model_env = resolve_model_env(None, self.binary)
        if self.binary.python_backend is not None:
            self._scratch = Path(tempfile.mkdtemp(prefix="echostream-triton-"))
            backend = self._scratch / "backends" / "python"
            backend.mkdir(parents=True)
            for item in self.binary.python_backend.iterdir():
                if item.is_file():
                    (backend / item.name).symlink_to(item)
            (backend / STUB).symlink_to(self.binary.stub_for(self.model_env.version))
        log = open(self.log_path, "w", encoding="utf-8") if self.log_path else None
        try:
            self.proc = subprocess.Popen(
                self.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.environment(), start_new_session=True, preexec_fn=_child_setup)
        except OSError as exc:
            if log:
                log.close()
            self._cleanup()
            raise ServeError(f"cannot start {self.binary.path}: {exc}") from None
        self._reader = threading.Thread(target=self._read, args=(log,), daemon=True,
                                        name="tritonserver-log")
        self._reader.start()
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def _read(self, log: TextIO | None) -> None:
        try:
            for raw in self.proc.stdout:
                line = raw.decode("utf-8", errors="replace")
                self.tail.append(line.rstrip("\n"))
                if log:
                    log.write(line)
                    log.flush()
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()
        finally:
            if log:
                log.close()

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while True:
            code = self.proc.poll()
            if code is not None:
                self._reader.join(timeout=5)
                raise ServeError(self.failure(code))
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServeError(f"tritonserver was not ready within {timeout_s:g} s "
                                 f"(last log line: {self.tail[-1] if self.tail else '(none)'})")
            time.sleep(0.2)

    def failure(self, code: int | None) -> str:
        """One line: why the server stopped (the model's load error when there is one)."""
        for line in self.tail:
            m = re.search(r"failed to load '([^']+)' version \d+: (.*)", line)
            if m:
                reason = m.group(2).split("\\n")[0].strip().strip('"')
                reason = re.sub(r"^\w+: (TritonModelException: )?(echostream: )?", "", reason)
                return f"model '{m.group(1)}' failed to load: {reason}"
        errors = [line for line in self.tail
                  if line.startswith("error:") or (line[:1] == "E" and line[1:5].isdigit())]
        last = errors[-1] if errors else (self.tail[-1] if self.tail else "(no output)")
        return f"tritonserver exited with status {code}: {last.strip()}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """Stop the server (and its stub processes); returns its exit status."""
        if self.proc is None:
            self._cleanup()
            return None
        timeout_s = self.exit_timeout_s + 5 if timeout_s is None else timeout_s
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stubs left behind, or a hung server
        except (ProcessLookupError, PermissionError):
            pass
        code = self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._cleanup()
        return code

    def kill(self) -> None:
        """SIGKILL the server and its stubs at once (tests: a server that dies mid-stream)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def _cleanup(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def stub_pids(self) -> list[int]:
        """Process ids of the model instances' stub processes."""
        if self.proc is None:
            return []
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.proc.pid and STUB in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def __enter__(self) -> "TritonServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def read_metrics(url: str, timeout_s: float = 5.0) -> dict[str, float]:
    """Prometheus text from the metrics port -> ``{'name{labels}': value}``."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        text = response.read().decode("utf-8")
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of a metric over the series whose labels include ``labels``."""
    total = 0.0
    for key, value in metrics.items():
        if key == name or key.startswith(name + "{"):
            if all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += value
    return total
