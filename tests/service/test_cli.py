"""``medcap`` as an operator runs it: real processes, real databases."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import create_engine, text

import migrations
from tests.conftest import PG_ADMIN_URL, series_files, storescu
from tests.processes import run, settings_env


@pytest.mark.processes
def test_help_lists_the_commands(settings):
    result = run(["--help"], settings_env(settings))
    assert result.returncode == 0
    for command in ("serve", "listen", "worker", "db", "studies", "force"):
        assert command in result.stdout


@pytest.mark.processes
def test_bad_setting_stops_start_up_naming_it(settings):
    result = run(["listen"], settings_env(settings, MEDCAP_DICOM_PORT="not-a-port"))
    assert result.returncode == 2
    assert "invalid setting MEDCAP_DICOM_PORT" in result.stderr


@pytest.mark.processes
def test_db_upgrade_on_a_fresh_embedded_database(make_settings, tmp_path):
    settings = make_settings(database_url="")  # the default: SQLite under the data dir
    env = settings_env(settings)
    env.pop("MEDCAP_DATABASE_URL")
    assert run(["db", "current"], env).returncode == 1
    result = run(["db", "upgrade"], env)
    assert result.returncode == 0, result.stderr
    assert f"is at revision {migrations.head_revision()}" in result.stdout
    assert (settings.data_dir / "medcap.sqlite").is_file()
    assert run(["db", "current"], env).returncode == 0


@pytest.mark.processes
def test_listen_refuses_an_unmigrated_database(settings, tmp_path):
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text('DROP DATABASE IF EXISTS "medcap_unmigrated" WITH (FORCE)'))
        conn.execute(text('CREATE DATABASE "medcap_unmigrated"'))
    try:
        url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/medcap_unmigrated"
        result = run(["listen"], settings_env(settings, MEDCAP_DATABASE_URL=url), timeout=60)
        assert result.returncode == 1
        assert "run `medcap db upgrade`" in result.stderr
    finally:
        with admin.connect() as conn:
            conn.execute(text('DROP DATABASE IF EXISTS "medcap_unmigrated" WITH (FORCE)'))
        admin.dispose()


@pytest.mark.peers
@pytest.mark.processes
def test_studies_and_force(settings, listener):
    env = settings_env(settings)
    assert "no studies received yet" in run(["studies"], env).stdout
    assert storescu(listener, series_files("ct-head-ge")[:4]).returncode == 0

    listing = run(["studies"], env).stdout
    assert "QMNx85rKkkg" in listing and "receiving (4 pending)" in listing
    (study,) = json.loads(run(["studies", "--json"], env).stdout)
    assert study["instances"] == 4 and study["pending"] == 4 and study["versions"] == 0

    forced = run(["force", study["study_uid"]], env)
    assert forced.returncode == 0, forced.stderr
    assert "job(s) 1 queued" in forced.stdout
    (study,) = json.loads(run(["studies", "--json"], env).stdout)
    assert study["pending"] == 0 and study["versions"] == 1 and study["latest_job_status"] == "enqueued"

    again = run(["force", study["study_uid"]], env)
    assert again.returncode == 0 and "nothing to force" in again.stdout
    unknown = run(["force", "1.2.3.4.5"], env)
    assert unknown.returncode == 1 and "no study 1.2.3.4.5 has been received" in unknown.stderr


@pytest.mark.peers
@pytest.mark.processes
def test_sample_writes_a_study_the_listener_stores_and_assembles(tmp_path, listener, assembler, settings, clock, db):
    """The README's first run: `medcap sample DIR` (as a command), then storescu sends it, and both studies become jobs."""
    written = run(["sample", str(tmp_path / "sample")], settings_env(settings))
    assert written.returncode == 0, written.stderr
    assert "ct-head: 24 instances" in written.stdout and "send it: TCP_NODELAY=1 /usr/bin/storescu" in written.stdout
    files = sorted((tmp_path / "sample").glob("*/*.dcm"))
    assert len(files) == 44
    sent = storescu(listener, files)
    assert sent.returncode == 0, sent.stderr
    clock.advance(settings.quiet_seconds + 1)
    assert len(assembler.tick()) == 2  # the CT and the MR study, one job each
