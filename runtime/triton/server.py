"""Start and stop the Triton server that ships in ``nvidia-pytriton``, on 127.0.0.1 (tests and demos).

``nvidia-pytriton`` 0.7 contains a real ``tritonserver`` 2.51 binary, its libraries
(``nvidia_pytriton.libs``), the python backend and one python-backend stub per Python version
(``python_backend_stubs/3.X``). We launch it as pytriton itself does (``pytriton/server/triton_server.py``):
``LD_LIBRARY_PATH`` gets the bundled libraries, ``PATH`` starts with the Python environment's ``bin`` (the
stub takes its ``sys.prefix`` from the ``python3`` it finds there), and the stub matching that Python
version is placed in a private copy of the backends directory. That environment must have NumPy < 2 (the
python backend's requirement), ``tokenizers``, ``safetensors`` and ``onnxruntime``:
``scripts/setup.sh`` creates it as ``.venv-triton``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendError

log = logging.getLogger(__name__)

_SETUP = "run `bash scripts/setup.sh` (it creates .venv-triton with nvidia-pytriton and numpy<2)."
_PROBE = (
    "import json, pathlib, sys, numpy, pytriton; root = pathlib.Path(pytriton.__file__).parent; "
    "print(json.dumps({'server': str(root / 'tritonserver'), 'libs': str(root.parent / 'nvidia_pytriton.libs'), "
    "'python': '%d.%d' % sys.version_info[:2], 'numpy': numpy.__version__}))"
)


@dataclass(frozen=True)
class TritonInstall:
    """Paths of pytriton's server inside one Python environment."""

    python: Path  # the environment's python executable
    server: Path  # .../pytriton/tritonserver
    libs: Path  # .../nvidia_pytriton.libs
    python_version: str  # "3.11"

    @property
    def binary(self) -> Path:
        return self.server / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.server / "python_backend_stubs" / self.python_version / "triton_python_backend_stub"


def find_install(python: str | Path) -> TritonInstall:
    """Locate pytriton's server in the environment of ``python``; :class:`BackendError` with the fix if absent."""
    python = Path(python)
    if not python.exists():
        raise BackendError(f"Python environment for Triton not found: {python} does not exist.", _SETUP)
    result = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise BackendError(f"{python} cannot import nvidia-pytriton and numpy ({result.stderr.strip()[-300:]}).",
                           _SETUP)
    info = json.loads(result.stdout.strip().splitlines()[-1])
    if int(info["numpy"].split(".")[0]) >= 2:
        raise BackendError(f"{python} has numpy {info['numpy']}; Triton's python backend needs numpy < 2.", _SETUP)
    install = TritonInstall(python, Path(info["server"]), Path(info["libs"]), info["python"])
    if not install.binary.is_file() or not install.stub.is_file():
        raise BackendError(f"nvidia-pytriton in {python} lacks {install.binary} or a stub for Python "
                           f"{install.python_version}.", "use Python 3.8-3.13 for .venv-triton; " + _SETUP)
    return install


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _backends_dir(install: TritonInstall, workdir: Path) -> Path:
    """A private backends dir: pytriton's python backend plus the stub for this Python version."""
    backends = workdir / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in (install.server / "backends" / "python").iterdir():
        if not (python / item.name).exists():
            (python / item.name).symlink_to(item)
    shutil.copy2(install.stub, python / "triton_python_backend_stub")
    return backends


class LocalTritonServer:
    """``tritonserver`` on 127.0.0.1 with free ports; ``start()`` waits until ready, ``stop()`` always kills.

    ``http_url`` / ``grpc_url`` are ``127.0.0.1:PORT``. The log goes to ``workdir/tritonserver.log``.
    """

    def __init__(self, repository: Path, python: str | Path, workdir: Path, model_config_name: str | None = None,
                 shm_prefix: str | None = None):
        self.repository = Path(repository)
        self.install = find_install(python)
        self.workdir = Path(workdir)
        self.model_config_name = model_config_name
        self.shm_prefix = shm_prefix or f"acestep_{os.getpid()}_{int(time.time() * 1000) % 10**9}_"
        self.ports = {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.log_path = self.workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def command(self) -> list[str]:
        backends = _backends_dir(self.install, self.workdir)
        cmd = [str(self.install.binary), f"--model-repository={self.repository}",
               f"--backend-directory={backends}", "--http-address=127.0.0.1", "--grpc-address=127.0.0.1",
               f"--http-port={self.ports['http']}", f"--grpc-port={self.ports['grpc']}",
               f"--metrics-port={self.ports['metrics']}", "--allow-metrics=false",
               f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
               "--exit-timeout-secs=10"]
        if self.model_config_name:
            cmd.append(f"--model-config-name={self.model_config_name}")
        return cmd

    def environment(self) -> dict:
        env = os.environ.copy()
        libs = str(self.install.libs)
        env["LD_LIBRARY_PATH"] = libs + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
        env["PATH"] = f"{self.install.python.parent}:{env.get('PATH', '')}"
        env.pop("PYTHONPATH", None)  # the stub must see only its own environment
        return env

    def start(self, timeout: float = 180.0) -> "LocalTritonServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        log.info("starting %s", " ".join(cmd))
        with open(self.log_path, "wb") as sink:
            self.process = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=self.environment(),
                                            cwd=self.workdir, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BackendError(f"tritonserver exited with code {self.process.returncode}:\n{self.log_tail()}",
                                   "read the log above; " + _SETUP)
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise BackendError(f"tritonserver was not ready within {timeout:.0f} s:\n{self.log_tail()}",
                           "read the log above.")

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM the server's process group, SIGKILL after ``grace`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def __enter__(self) -> "LocalTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
