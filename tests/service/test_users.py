"""The review app's users: the domain rules (service/users.py) and `medcap users add|disable|enable|reset-password|list`
run as real processes, the password always on stdin."""

from __future__ import annotations

import fcntl
import getpass
import os
import pty
import re
import select as io_select
import subprocess
import termios
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.schema import AuditEvent, Role, User
from service.users import UserError, Users, check_display_name, check_password, check_role, check_username
from service.web.app import create_app
from tests.conftest import wait_until
from tests.processes import MEDCAP, run, settings_env

PASSWORD = "a long enough passphrase"
ME = f"cli:{getpass.getuser()}"


def add(env: dict[str, str], name: str, *, role: str = "radiologist", display: str = "Smith^Jane", password: str = PASSWORD):
    return run(["users", "add", name, "--role", role, "--display-name", display], env, stdin=password + "\n")


def user_rows(db) -> list[User]:
    with db.session() as s:
        return list(s.scalars(select(User).order_by(User.username)))


def audit(db, prefix: str) -> list[AuditEvent]:
    with db.session() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.action.startswith(prefix)).order_by(AuditEvent.id)))


def can_sign_in(app, username: str, password: str) -> bool:
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as c:
        page = c.get("/login")
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
        response = c.post("/login", data={"username": username, "password": password, "login_csrf": token, "next": "/"})
        return response.status_code == 303


# -- the rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smith", "j.smith", "rad_2", "a-b", "ab"])
def test_good_user_names(name):
    assert check_username(name) == name


@pytest.mark.parametrize("name", ["", "a", "Smith", "1smith", "smith jane", "smith@example.org", "x" * 65, "émile", "-smith"])
def test_bad_user_names_say_what_is_allowed(name):
    with pytest.raises(UserError, match="lower-case letters, digits"):
        check_username(name)


def test_a_user_name_with_a_trailing_newline_is_refused():
    with pytest.raises(UserError):
        check_username("smith\n")


@pytest.mark.parametrize(
    "name, why",
    [
        ("Smith", "Family^Given"),
        ("^Jane", "Family^Given"),
        ("", "Family^Given"),
        ("Smith\\Jones^Jane", "no backslashes"),
        ("Smith=X^Jane", "no backslashes"),
        ("Smith^Jane\n", "control characters"),
        ("S" * 330 + "^J", "Family^Given"),
    ],
)
def test_bad_display_names(name, why):
    with pytest.raises(UserError, match=re.escape(why)):
        check_display_name(name)
    assert check_display_name("Smith^Jane^Q^Dr^MD") == "Smith^Jane^Q^Dr^MD"


def test_roles_and_passwords():
    assert check_role("admin") is Role.ADMIN and check_role("radiologist") is Role.RADIOLOGIST
    with pytest.raises(UserError, match="choose radiologist or admin"):
        check_role("root")
    for bad, why in (
        ("short", "at least 12"),
        ("x" * 11, "at least 12"),
        (" leading space x", "leading or trailing"),
        ("trailing space x ", "leading or trailing"),
        ("two\nlines here", "line breaks"),
        # issue 12: length alone let these in
        ("aaaaaaaaaaaa", "Repeats"),
        ("x" * 40, "Repeats"),
        ("password1234", "very common password"),
        ("Password123!", "similar to a commonly used password"),
        ("qwertyuiopas", "commonly used password"),
        ("123qweasdzxc", "easy to guess|common"),
        ("abcabcabcabc", "Repeats"),
    ):
        with pytest.raises(UserError, match=why):
            check_password(bad)
    assert check_password("a long enough passphrase") == "a long enough passphrase"
    assert check_password("Tr0ub4dor&3 extra") == "Tr0ub4dor&3 extra"


def test_accounts_are_argon2id_hashed_and_authenticated(db, clock):
    users = Users(db, clock)
    account = users.add("smith", "Smith^Jane", "radiologist", PASSWORD, "cli:test")
    (row,) = user_rows(db)
    assert row.password_hash.startswith("$argon2id$") and PASSWORD not in row.password_hash
    assert users.authenticate("smith", PASSWORD) == account and account.readable_name == "Jane Smith"
    assert users.authenticate("smith", PASSWORD + "x") is None and users.authenticate("nobody", PASSWORD) is None
    with pytest.raises(UserError, match="exists already"):
        users.add("smith", "Smith^John", "admin", PASSWORD, "cli:test")
    users.set_disabled("smith", True, "cli:test")
    assert users.authenticate("smith", PASSWORD) is None and users.get(account.id) is None
    users.set_disabled("smith", False, "cli:test")
    users.reset_password("smith", "another passphrase", "cli:test")
    assert users.authenticate("smith", PASSWORD) is None and users.authenticate("smith", "another passphrase") == account
    for action in (lambda: users.set_disabled("ghost", True, "x"), lambda: users.reset_password("ghost", PASSWORD, "x")):
        with pytest.raises(UserError, match="there is no user 'ghost'"):
            action()
    events = audit(db, "user.")
    assert [e.action for e in events] == ["user.added", "user.disabled", "user.enabled", "user.password_reset"]
    assert all(PASSWORD not in str(e.details) and "argon2" not in str(e.details) for e in events)


def test_an_old_hash_is_upgraded_at_the_next_sign_in(db, clock):
    users = Users(db, clock)
    users.add("smith", "Smith^Jane", "radiologist", PASSWORD, "cli:test")
    weak = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash(PASSWORD)
    with db.session() as s:
        s.scalars(select(User)).one().password_hash = weak
    assert users.authenticate("smith", PASSWORD) is not None
    (row,) = user_rows(db)
    assert row.password_hash != weak and not PasswordHasher().check_needs_rehash(row.password_hash)


# -- the command line -------------------------------------------------------------------------


@pytest.mark.processes
def test_users_from_the_command_line(make_settings, db, clock):
    settings = make_settings(login_max_failures=1000)  # the wrong passwords below are meant, not an attack
    env = settings_env(settings)
    app = create_app(settings, db, clock)
    listing = run(["users", "list"], env)
    assert listing.returncode == 0 and listing.stdout.startswith("no users yet: add the first admin with `medcap users add")
    assert user_rows(db) == []  # no default users
    assert not any(can_sign_in(app, name, password) for name, password in (("admin", "admin"), ("admin", "password"), ("root", "root")))

    added = add(env, "smith")
    assert added.returncode == 0 and added.stdout.strip() == "user smith added as radiologist", added.stderr
    assert add(env, "root", role="admin", display="Admin^Ann").returncode == 0
    assert PASSWORD not in added.stdout + added.stderr
    (root, smith) = user_rows(db)
    assert (smith.role, smith.display_name, smith.disabled) == ("radiologist", "Smith^Jane", False) and root.role == "admin"
    assert smith.password_hash.startswith("$argon2id$")
    assert can_sign_in(app, "smith", PASSWORD) and can_sign_in(app, "root", PASSWORD)
    listing = run(["users", "list"], env).stdout.splitlines()
    assert [line.split()[:3] for line in listing] == [["root", "admin", "Admin^Ann"], ["smith", "radiologist", "Smith^Jane"]]

    # disable: refused at sign-in, and a session that is already open stops working at once
    with TestClient(app, base_url="https://testserver", follow_redirects=False) as live:
        page = live.get("/login")
        token = re.search(r'name="login_csrf" value="([^"]+)"', page.text).group(1)
        assert live.post("/login", data={"username": "smith", "password": PASSWORD, "login_csrf": token}).status_code == 303
        assert live.get("/api/me").status_code == 200
        disabled = run(["users", "disable", "smith"], env)
        assert disabled.returncode == 0 and disabled.stdout.strip() == "user smith disabled"
        assert live.get("/api/me").status_code == 401
    assert not can_sign_in(app, "smith", PASSWORD)
    assert "smith" in run(["users", "list"], env).stdout and "(disabled)" in run(["users", "list"], env).stdout
    enabled = run(["users", "enable", "smith"], env)
    assert enabled.returncode == 0 and enabled.stdout.strip() == "user smith enabled" and can_sign_in(app, "smith", PASSWORD)

    reset = run(["users", "reset-password", "smith"], env, stdin="the new passphrase\n")
    assert reset.returncode == 0 and reset.stdout.strip() == "password of smith changed"
    assert not can_sign_in(app, "smith", PASSWORD) and can_sign_in(app, "smith", "the new passphrase")

    events = audit(db, "user.")
    assert [(e.action, e.object_id) for e in events] == [
        ("user.added", "smith"),
        ("user.added", "root"),
        ("user.disabled", "smith"),
        ("user.enabled", "smith"),
        ("user.password_reset", "smith"),
    ]
    assert {e.actor for e in events} == {ME}
    assert events[0].details == {"role": "radiologist", "display_name": "Smith^Jane"}


@pytest.mark.processes
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_command_line_mistakes_get_clear_errors_and_change_nothing(settings, db):
    env = settings_env(settings)
    cases = [
        (dict(name="Smith"), 1, "medcap: user name 'Smith': use 2-64 lower-case letters, digits, '.', '_' or '-', starting with a letter"),
        (
            dict(name="smith", display="Smith Jane"),
            1,
            "medcap: display name 'Smith Jane': write it as a DICOM person name, Family^Given (e.g. Smith^Jane)",
        ),
        (dict(name="smith", display="Smith\\Jane^X"), 1, "no backslashes, '=' or control characters"),
        (dict(name="smith", password="short"), 1, "medcap: password: at least 12 characters"),
        (dict(name="smith", password=""), 1, "medcap: password: at least 12 characters"),  # nothing on stdin
        (dict(name="smith", password=" " + PASSWORD), 1, "medcap: password: no leading or trailing spaces"),
        (dict(name="smith", role="superuser"), 2, "argument --role: invalid choice: 'superuser' (choose from "),
    ]
    for kwargs, status, message in cases:
        result = add(env, **kwargs)
        assert result.returncode == status and message in result.stderr, (kwargs, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    missing = run(["users", "add", "smith", "--role", "radiologist"], env, stdin=PASSWORD + "\n")
    assert missing.returncode == 2 and "the following arguments are required: --display-name" in missing.stderr
    assert user_rows(db) == [] and audit(db, "user.") == []

    assert add(env, "smith").returncode == 0
    again = add(env, "smith", display="Smith^John")
    assert again.returncode == 1 and "medcap: user 'smith' exists already" in again.stderr
    for args in (["disable", "ghost"], ["enable", "ghost"], ["reset-password", "ghost"]):
        result = run(["users", *args], env, stdin=PASSWORD + "\n")
        assert result.returncode == 1 and "medcap: there is no user 'ghost'" in result.stderr, args
    short = run(["users", "reset-password", "smith"], env, stdin="short\n")
    assert short.returncode == 1 and "at least 12 characters" in short.stderr
    assert [e.action for e in audit(db, "user.")] == ["user.added"]


@pytest.mark.processes
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_password_is_never_in_argv(settings, db):
    env = settings_env(settings)
    # There is no option to give it on the command line ...
    for flag in ("--password", "-p"):
        result = run(["users", "add", "smith", "--role", "radiologist", "--display-name", "Smith^Jane", flag, PASSWORD], env)
        assert result.returncode == 2 and ("unrecognized arguments" in result.stderr or "expected one argument" in result.stderr), flag
    assert user_rows(db) == []
    # ... and while the command waits for it, what `ps` shows holds no secret; it reads the password from stdin.
    proc = subprocess.Popen(
        [*MEDCAP, "users", "add", "smith", "--role", "radiologist", "--display-name", "Smith^Jane"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        argv: list[bytes] = []

        def started() -> bool:  # /proc shows the new command line once the child has exec'd
            argv[:] = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
            return b"service.cli" in argv

        wait_until(started, "the command to start", timeout=30)
        out, err = proc.communicate(PASSWORD + "\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert b"users" in argv and not any(PASSWORD.encode() in a for a in argv)
    assert not any(PASSWORD in v for v in env.values())
    assert PASSWORD not in out + err
    with db.session() as s:
        assert all(PASSWORD not in str(e.details) for e in s.scalars(select(AuditEvent)))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.processes
def test_on_a_terminal_the_password_is_asked_twice(settings, db):
    env = settings_env(settings)

    def on_terminal(first: str, second: str) -> tuple[int, str]:
        controller, terminal = pty.openpty()
        proc = subprocess.Popen(
            [*MEDCAP, "users", "add", "smith", "--role", "radiologist", "--display-name", "Smith^Jane"],
            env=env,
            stdin=terminal,
            stdout=terminal,
            stderr=terminal,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
            cwd=Path(__file__).resolve().parents[2],
        )
        os.close(terminal)
        output = b""

        def read_until(prompt: bytes) -> bool:
            nonlocal output
            if io_select.select([controller], [], [], 0.1)[0]:
                try:
                    output += os.read(controller, 4096)
                except OSError:  # the command has exited and closed the terminal
                    return True
            return prompt in output

        try:
            wait_until(lambda: read_until(b"Password: "), "the password prompt", timeout=60)
            os.write(controller, first.encode() + b"\n")
            wait_until(lambda: read_until(b"Again: "), "the second prompt", timeout=30)
            os.write(controller, second.encode() + b"\n")
            proc.wait(timeout=60)
            wait_until(lambda: read_until(b"medcap: ") or read_until(b"user smith added"), "the answer", timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(controller)
        return proc.returncode, output.decode(errors="replace")

    status, output = on_terminal(PASSWORD, PASSWORD + "x")
    assert status == 1 and "medcap: the two passwords differ" in output and PASSWORD not in output  # not echoed
    assert user_rows(db) == []
    status, output = on_terminal(PASSWORD, PASSWORD)
    assert status == 0 and "user smith added as radiologist" in output and PASSWORD not in output
    assert Users(db, None).authenticate("smith", PASSWORD) is not None
