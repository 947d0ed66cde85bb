#!/usr/bin/env python3
"""Container health check of the MedCap images, installed as ``medcap-healthcheck``.

    medcap-healthcheck listen   the DICOM port (MEDCAP_DICOM_PORT) accepts a TCP connection
    medcap-healthcheck worker   a Celery worker of this container answers a ping over the broker
    medcap-healthcheck [auto]   whichever of the two fits the medcap command this container runs
                                (listen, serve: the port; worker: the ping; a one-shot such as
                                ``db upgrade``: nothing to check)

Exit status 0 is healthy, 1 unhealthy, with the reason on stderr (``docker inspect`` shows it).

``listen`` only opens and closes a TCP connection: no association is requested, so nothing is
written to the audit database. ``worker`` sends Celery's ``ping`` control command and waits for
the reply of a worker whose node name ends in ``@<this container's host name>`` (``medcap worker``
names its node ``medcap-<queues>-<pid>@<host>``); the reply comes from the worker's main process,
so it shows that the worker is running, connected to the broker and consuming, also while a long
caption job runs in a pool process. It relies on each container having a host name of its own
(Docker's default; with ``network_mode: host`` every worker on the host would answer for the
others). It does not show that the model loaded: a load failure is logged, and each caption job
then fails and is retried. With a broker that cannot broadcast (the embedded SQLite one) there is
no ping; the check then only finds the worker's process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

DEFAULT_DICOM_PORT = 11112
PING_TIMEOUT_SECONDS = 3.0


class Unhealthy(Exception):
    pass


# -- which medcap command this container runs --------------------------------------------------


def medcap_command(argv: list[str]) -> str | None:
    """The medcap subcommand in a medcap command line (``worker`` in ``medcap --config f worker``)."""
    if argv[1:3] == ["-m", "service.cli"]:  # how `medcap serve` starts its workers
        args = argv[3:]
    else:
        programs = [Path(arg).name for arg in argv[:2]]  # "medcap ..." or "python /usr/local/bin/medcap ..."
        if "medcap" not in programs:
            return None
        args = argv[programs.index("medcap") + 1 :]
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main_command(proc: Path = Path("/proc")) -> str | None:
    """The subcommand of the oldest medcap process in this container (the main one: a worker's pool
    processes and ``serve``'s workers are started after it)."""
    found: list[tuple[int, str]] = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode(errors="replace") for a in (entry / "cmdline").read_bytes().split(b"\0") if a]
        except OSError:
            continue  # gone since the listing, or not ours to read
        command = medcap_command(argv)
        if command is not None:
            found.append((int(entry.name), command))
    return min(found)[1] if found else None


# -- the checks ------------------------------------------------------------------------------


def check_port(host: str, port: int, timeout: float = 2.0) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        raise Unhealthy(f"DICOM port {host}:{port} does not accept connections: {exc}") from None


def check_listener(environ: dict[str, str] | None = None) -> str:
    environ = dict(os.environ) if environ is None else environ
    port = int(environ.get("MEDCAP_DICOM_PORT", DEFAULT_DICOM_PORT))
    bind = environ.get("MEDCAP_DICOM_BIND_ADDRESS", "0.0.0.0")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    check_port(host, port)
    return f"DICOM port {host}:{port} accepts connections"


def check_web(environ: dict[str, str] | None = None, timeout: float = 5.0) -> str:
    """The review app answers its sign-in page (no session, nothing written but nothing either)."""
    import urllib.request

    environ = dict(os.environ) if environ is None else environ
    port = int(environ.get("MEDCAP_WEB_PORT", "8080"))
    bind = environ.get("MEDCAP_WEB_BIND_ADDRESS", "127.0.0.1")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    scheme = "https" if environ.get("MEDCAP_WEB_TLS_CERT_FILE") else "http"
    context = None
    if scheme == "https":
        import ssl

        context = ssl._create_unverified_context()  # a liveness probe of our own port, not a trust decision
    try:
        with urllib.request.urlopen(f"{scheme}://{host}:{port}/login", timeout=timeout, context=context) as response:
            status = response.status
    except OSError as exc:
        raise Unhealthy(f"web app on {host}:{port} does not answer: {exc}") from None
    if status != 200:
        raise Unhealthy(f"web app on {host}:{port} answered {status}")
    return f"web app on {host}:{port} answers"


def own_nodes(replies: Iterable[dict[str, object]], hostname: str) -> list[str]:
    """The node names in Celery ping replies that belong to a worker on ``hostname``."""
    return sorted(node for reply in replies for node in reply if node.endswith(f"@{hostname}"))


def check_worker(timeout: float = PING_TIMEOUT_SECONDS) -> str:
    from service.settings import SettingsError, load_settings
    from workers.celery_app import configure

    try:
        app = configure(load_settings())
    except SettingsError as exc:
        raise Unhealthy(str(exc)) from None
    hostname = socket.gethostname()
    with app.connection_for_write() as conn:
        if "fanout" not in conn.transport.implements.exchange_type:
            if main_command() != "worker":
                raise Unhealthy("no medcap worker process is running")
            return f"medcap worker process running (the {conn.transport_cls} broker cannot broadcast, so no ping)"
        try:
            # Only workers whose node name matches answer; the first answer ends the wait.
            replies = app.control.ping(timeout=timeout, connection=conn, pattern=f"*@{hostname}", matcher="glob", limit=1)
        except Exception as exc:  # the broker is down or unreachable
            raise Unhealthy(f"cannot ping over the broker: {exc}") from None
    nodes = own_nodes(replies, hostname)
    if not nodes:
        others = sorted(node for reply in replies for node in reply)
        raise Unhealthy(f"no worker on {hostname} answered a ping within {timeout:g} s (answered: {', '.join(others) or 'none'})")
    return f"{', '.join(nodes)} answered"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medcap-healthcheck", description="health check of a MedCap container")
    parser.add_argument("what", nargs="?", default="auto", choices=["auto", "listen", "worker", "web"])
    args = parser.parse_args(argv)
    what = args.what
    try:
        if what == "auto":
            command = main_command()
            if command is None:
                raise Unhealthy("no medcap process is running")
            what = {"listen": "listen", "serve": "listen", "worker": "worker", "web": "web"}.get(command, "")
            if not what:
                print(f"medcap {command}: nothing to check")
                return 0
        print({"listen": check_listener, "worker": check_worker, "web": check_web}[what]())
        return 0
    except Unhealthy as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
