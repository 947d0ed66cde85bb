"""Running ``medcap`` commands as real processes in tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from service.settings import Settings
from tests.tiers import requires

MEDCAP = [sys.executable, "-m", "service.cli"]


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process see ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAP_") or k.startswith("MEDCAP_TEST_")}
    env.update(
        MEDCAP_DATA_DIR=str(settings.data_dir),
        MEDCAP_DATABASE_URL=settings.effective_database_url,
        MEDCAP_BROKER_URL=settings.effective_broker_url,
        MEDCAP_DICOM_PORT=str(settings.dicom_port),
        MEDCAP_DICOM_BIND_ADDRESS=settings.dicom_bind_address,
        MEDCAP_ALLOWED_PEERS=",".join(map(str, settings.allowed_peers)),
        MEDCAP_QUIET_SECONDS=str(settings.quiet_seconds),
        MEDCAP_MAX_WAIT_SECONDS=str(settings.max_wait_seconds),
        MEDCAP_MIN_FREE_DISK_MB=str(settings.min_free_disk_mb),
        MEDCAP_ASSEMBLY_INTERVAL_SECONDS=str(settings.assembly_interval_seconds),
        MEDCAP_WEB_PORT=str(settings.web_port),
    )
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    requires("processes")
    return subprocess.run(
        MEDCAP + args, env=env, capture_output=True, text=True, timeout=timeout, input=stdin, cwd=Path(__file__).resolve().parents[1]
    )


class Process:
    """A long-running ``medcap`` command in its own process group, always cleaned up."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        requires("processes")
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen(
            MEDCAP + args,
            env=env,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=Path(__file__).resolve().parents[1],
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=timeout)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._fh.close()
