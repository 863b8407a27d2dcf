"""Start the sandbox as a separate process on a free loopback port (demo, tests, benchmark)."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LaunchedSandbox:
    process: subprocess.Popen
    url: str
    data_dir: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def launch(work: Path, *options: str, timeout: float = 20.0) -> LaunchedSandbox:
    """Run ``usage-billing-sandbox`` with its data in ``work``/data; wait until it listens."""
    work.mkdir(parents=True, exist_ok=True)
    port_file = work / "port"
    port_file.unlink(missing_ok=True)
    data_dir = work / "data"
    executable = Path(sys.executable).parent / "usage-billing-sandbox"
    command = [str(executable), "--port", "0", "--port-file", str(port_file), "--data-dir", str(data_dir)]
    process = subprocess.Popen(
        [*command, *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    deadline = time.monotonic() + timeout
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            error = process.stderr.read().decode(errors="replace") if process.stderr else ""
            raise RuntimeError(f"usage-billing-sandbox did not start: {error.strip()}")
        time.sleep(0.05)
    scheme = "https" if "--tls-cert" in options else "http"
    return LaunchedSandbox(process, f"{scheme}://127.0.0.1:{port_file.read_text()}", data_dir)
