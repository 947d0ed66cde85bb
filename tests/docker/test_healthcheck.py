"""docker/healthcheck.py: what it decides a container runs, and its checks against real sockets."""

from __future__ import annotations

import socket

import pytest

from tests.docker.conftest import load_script

hc = load_script("healthcheck")


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["/usr/local/bin/python", "/usr/local/bin/medcap", "listen"], "listen"),
        (["medcap", "worker", "--queues", "caption", "--device", "cuda:0"], "worker"),
        (["/opt/venv/bin/python3.11", "/opt/venv/bin/medcap", "--config", "/etc/medcap.toml", "worker"], "worker"),
        (["/usr/local/bin/python", "-m", "service.cli", "worker", "--queues", "dispatch"], "worker"),  # serve's children
        (["/usr/local/bin/python", "/usr/local/bin/medcap", "db", "upgrade"], "db"),
        (["/usr/local/bin/python", "/usr/local/bin/medcap"], None),
        (["/usr/local/bin/python", "/usr/local/bin/medcap-healthcheck", "worker"], None),  # the check itself
        (["redis-server", "*:6379"], None),
        (["/usr/bin/python3", "/tmp/listen.py", "medcap"], None),
    ],
)
def test_medcap_command(argv, command):
    assert hc.medcap_command(argv) == command


def _proc(tmp_path, processes):
    for pid, argv in processes.items():
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (tmp_path / "self").mkdir()
    (tmp_path / "sys").mkdir()
    return tmp_path


def test_main_command_is_the_oldest_medcap_process(tmp_path):
    proc = _proc(
        tmp_path,
        {
            1: ["/usr/local/bin/python", "/usr/local/bin/medcap", "serve"],
            40: ["/usr/local/bin/python", "-m", "service.cli", "worker", "--queues", "caption"],
            41: ["/usr/local/bin/python", "/usr/local/bin/medcap-healthcheck"],
        },
    )
    assert hc.main_command(proc) == "serve"


def test_main_command_behind_an_init(tmp_path):
    proc = _proc(tmp_path, {1: ["/sbin/docker-init", "--", "medcap", "worker"], 7: ["medcap", "worker", "--queues", "dispatch"]})
    assert hc.main_command(proc) == "worker"


def test_main_command_without_medcap(tmp_path):
    assert hc.main_command(_proc(tmp_path, {1: ["sleep", "infinity"]})) is None


def test_listen_check_against_a_real_socket():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert f"127.0.0.1:{port}" in hc.check_listener({"MEDCAP_DICOM_PORT": str(port)})
    with pytest.raises(hc.Unhealthy, match="does not accept connections"):
        hc.check_listener({"MEDCAP_DICOM_PORT": str(port)})  # closed now


def test_listen_check_uses_a_specific_bind_address():
    with socket.socket() as server:
        server.bind(("127.0.0.2", 0))
        server.listen()
        port = server.getsockname()[1]
        env = {"MEDCAP_DICOM_PORT": str(port), "MEDCAP_DICOM_BIND_ADDRESS": "127.0.0.2"}
        assert "127.0.0.2" in hc.check_listener(env)


def test_listen_check_default_port_is_the_settings_default():
    from service.settings import Settings

    assert hc.DEFAULT_DICOM_PORT == Settings.model_fields["dicom_port"].default


def test_own_nodes_are_those_on_this_host():
    replies = [{"medcap-caption-1@abc123": {"ok": "pong"}}, {"medcap-dispatch-1@other": {"ok": "pong"}}]
    assert hc.own_nodes(replies, "abc123") == ["medcap-caption-1@abc123"]
    assert hc.own_nodes(replies, "abc") == []
    assert hc.own_nodes([], "abc123") == []


def test_worker_check_with_the_broker_down_is_unhealthy(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    monkeypatch.setenv("MEDCAP_BROKER_URL", f"redis://127.0.0.1:{port}/0")
    with pytest.raises(hc.Unhealthy, match="cannot ping over the broker"):
        hc.check_worker(timeout=0.5)


def test_cli_exit_status(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDCAP_DICOM_PORT", str(port))
        assert hc.main(["listen"]) == 1
    assert "unhealthy" in capsys.readouterr().err
