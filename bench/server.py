"""Start and stop a real TorchServe on free loopback ports (for the benchmarks and the integration
tests), configured from the repository's ``config.properties`` and ``metrics.yaml``."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from export.client import TorchServeClient, read_keys

REPO = Path(__file__).resolve().parents[1]
#: TorchServe's logging as the project ships it (deploy/torchserve-log4j2.xml says what it changes)
LOG_CONFIG = REPO / "deploy" / "torchserve-log4j2.xml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_from_shipped(workdir: Path, model_store: Path, **overrides: str) -> tuple[Path, dict[str, int]]:
    """The shipped config.properties with fresh loopback ports and the given model store."""
    ports = {"inference": free_port(), "management": free_port(), "metrics": free_port()}
    text = (REPO / "config.properties").read_text()
    for name, port in ports.items():
        text = re.sub(rf"^{name}_address=.*$", f"{name}_address=http://127.0.0.1:{port}", text, flags=re.M)
    text = re.sub(r"^model_store=.*$", f"model_store={model_store}", text, flags=re.M)
    overrides = {"grpc_inference_port": str(free_port()), "grpc_management_port": str(free_port()),
                 "metrics_config": str(REPO / "metrics.yaml"), **overrides}
    for key, value in overrides.items():
        if re.search(rf"^{key}=", text, flags=re.M):
            text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
        else:
            text += f"\n{key}={value}\n"
    path = workdir / "config.properties"
    path.write_text(text)
    return path, ports


def stop_group(proc: subprocess.Popen | None) -> None:
    """Stop a server started with ``start_new_session=True`` and all its children: SIGTERM to
    its process group, SIGKILL after 20 s."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


class TorchServe:
    """``with TorchServe(workdir, store, {"tiny": "tiny.mar"}) as ts: ts.client.post_image(...)``"""

    def __init__(self, workdir: Path, model_store: Path, models: dict[str, str], timeout: float = 120,
                 **config: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.model_store = Path(model_store)
        self.models = models
        self.timeout = timeout
        self.config_path, self.ports = config_from_shipped(self.workdir, self.model_store, **config)
        self.proc: subprocess.Popen | None = None
        self.tmp: Path | None = None
        self.client = TorchServeClient(f"http://127.0.0.1:{self.ports['inference']}",
                                       f"http://127.0.0.1:{self.ports['management']}",
                                       key_file=self.workdir / "key_file.json")

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"

    def log(self, name: str = "model_log.log") -> str:
        path = self.workdir / "logs" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, wait: bool = True) -> TorchServe:
        """Start the server; with ``wait``, block until every model has a READY worker."""
        torchserve = Path(sys.executable).parent / "torchserve"
        # A private temporary folder gives this server its own pid file (TMPDIR, read by the
        # launcher) and its own worker sockets (TEMP: the launcher passes it to Java as
        # java.io.tmpdir, where the frontend puts .ts.sock.<port>), so it runs beside a demo
        # server or another test's. Short, under /tmp: a Unix socket path has at most 107 bytes.
        self.tmp = Path(tempfile.mkdtemp(prefix="ts-"))
        env = dict(os.environ, LOG_LOCATION=str(self.workdir / "logs"), TMPDIR=str(self.tmp), TEMP=str(self.tmp),
                   METRICS_LOCATION=str(self.workdir / "logs"), TS_CONFIG_FILE=str(self.config_path))
        cmd = [str(torchserve), "--start", "--foreground", "--ncs", "--ts-config", str(self.config_path),
               "--log-config", str(LOG_CONFIG), "--model-store", str(self.model_store),
               "--models", *[f"{name}={mar}" for name, mar in self.models.items()]]
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=open(self.workdir / "ts.out", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while not (self.workdir / "key_file.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"TorchServe did not start:\n{(self.workdir / 'ts.out').read_text()[-3000:]}")
            time.sleep(0.2)
        if wait:
            for name in self.models:
                self.client.wait_ready(name, timeout=max(deadline - time.monotonic(), 1))
        return self

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> TorchServe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def post(ts: TorchServe, body: bytes, content_type: str = "image/png", endpoint: str = "predictions",
         model: str = "tiny", auth: bool = True, timeout: float = 60) -> requests.Response:
    """POST ``body`` to ``endpoint/model`` of ``ts`` (with the inference token unless ``auth`` is false)."""
    headers = {"Content-Type": content_type}
    if auth:
        headers["Authorization"] = f"Bearer {read_keys(ts.workdir / 'key_file.json')['inference']}"
    return requests.post(f"{ts.client.url}/{endpoint}/{model}", data=body, headers=headers, timeout=timeout)


_PLAIN_MODEL_SERVER = """
import sys, tempfile
from pathlib import Path
mar, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.argv = sys.argv[:1]  # kserve parses the command line when imported
import kserve
from handlers.kserve_model import create_model
from handlers.runtime.source import ServedModel, from_mar
src = from_mar(Path(mar), Path(tempfile.mkdtemp(prefix="kserve-plain-")))
model = create_model(ServedModel(name, src.model_dir, src.handler), gpu_id=None)
model.load()
kserve.ModelServer(http_port=port, enable_grpc=False, workers=1).start([model])
"""


class KServeServer:
    """KServe's Python model server with the explainer (``handlers/kserve_model.py``) on a free
    loopback port: ``with KServeServer(workdir, mar=path, name="m") as ks: ks.url``."""

    def __init__(self, workdir: Path, mar: Path, name: str, timeout: float = 120, plain: bool = False,
                 settings: dict[str, object] | None = None, args: Sequence[str] = ()) -> None:
        """``plain``: run the model as a host that builds it with ``create_model`` under its own
        ``kserve.ModelServer`` would (binds every interface: KServe's server has no host
        option), instead of through ``concept-explainer-kserve``. ``settings``: handler
        settings over the archive's (``--config``), e.g. ``{"max_inflight": 2}``; ``args``: more
        options of ``concept-explainer-kserve`` (e.g. ``["--drain-seconds", "1"]``)."""
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.mar, self.name, self.timeout, self.plain = Path(mar), name, timeout, plain
        self.settings = settings
        self.args = list(args)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        path = self.workdir / "kserve.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> KServeServer:
        cmd = [sys.executable, "-m", "handlers.kserve_model", "--mar", str(self.mar), "--name", self.name,
               "--http-port", str(self.port)]
        cmd += self.args
        if self.settings is not None:
            config = self.workdir / "model-config.yaml"
            config.write_text(json.dumps({"handler": self.settings}))  # JSON is YAML
            cmd += ["--config", str(config)]
        if self.plain:
            cmd = [sys.executable, "-c", _PLAIN_MODEL_SERVER, str(self.mar), self.name, str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=open(self.workdir / "kserve.out", "wb"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                if requests.get(f"{self.url}/v1/models/{self.name}", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the KServe model server did not start:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        stop_group(self.proc)
        self.proc = None

    def __enter__(self) -> KServeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
