import pytest

from service.settings import AllowedPeer, SettingsError, load_settings
from tests.pki import make_ca


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.dicom_ae_title, s.dicom_port, s.quiet_seconds, s.allowed_peers) == ("MEDCAP", 11112, 30.0, ())
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'medcap-data' / 'medcap.sqlite'}"
    assert s.effective_broker_url == f"sqla+sqlite:///{tmp_path / 'medcap-data' / 'broker.sqlite'}"


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("MEDCAP_ALLOWED_PEERS", "ORTHANC@127.0.0.1/32, PACS1@10.1.0.0/16")
    monkeypatch.setenv("MEDCAP_DICOM_AE_TITLE", "AI_NODE")
    monkeypatch.setenv("MEDCAP_QUIET_SECONDS", "5")
    s = load_settings()
    assert [str(p) for p in s.allowed_peers] == ["ORTHANC@127.0.0.1/32", "PACS1@10.1.0.0/16"]
    assert s.dicom_ae_title == "AI_NODE" and s.quiet_seconds == 5


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEDCAP_DICOM_PORT", "70000", "MEDCAP_DICOM_PORT"),
        ("MEDCAP_DICOM_PORT", "eleven", "MEDCAP_DICOM_PORT"),
        ("MEDCAP_DICOM_AE_TITLE", "WAY_TOO_LONG_AE_TITLE", "MEDCAP_DICOM_AE_TITLE"),
        ("MEDCAP_ALLOWED_PEERS", "ORTHANC", "MEDCAP_ALLOWED_PEERS"),
        ("MEDCAP_ALLOWED_PEERS", "ORTHANC@300.1.1.1", "MEDCAP_ALLOWED_PEERS"),
        ("MEDCAP_QUIET_SECONDS", "0", "MEDCAP_QUIET_SECONDS"),
        ("MEDCAP_MAX_WAIT_SECONDS", "10", "max_wait_seconds must be at least quiet_seconds"),
        ("MEDCAP_QUIET_SECOND", "1", "unknown setting MEDCAP_QUIET_SECOND .did you mean MEDCAP_QUIET_SECONDS"),
        ("MEDCAP_DESTINATIONS", "ORTHANC@127.0.0.1", "MEDCAP_DESTINATIONS"),
        ("MEDCAP_DESTINATIONS", "ORTHANC@127.0.0.1:99999", "MEDCAP_DESTINATIONS"),
        ("MEDCAP_JOB_TIME_LIMIT_SECONDS", "900", "job_redeliver_seconds must be longer than job_time_limit_seconds"),
        ("MEDCAP_DEVICE", "gpu0", "MEDCAP_DEVICE"),
        ("MEDCAP_GENERATION_PRESET", "greedy", "MEDCAP_GENERATION_PRESET"),
        ("MEDCAP_DISPATCH_TLS_CA_FILE", "/nonexistent/ca.pem", "dispatch_tls: ClientTLS.ca_file"),
        ("MEDCAP_DISPATCH_TLS_CERT_FILE", "/etc/hostname", "need dispatch_tls_ca_file"),
        ("MEDCAP_MODEL", "/tmp", "not a MedCap checkpoint directory"),
    ],
)
def test_bad_values_name_the_setting(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_toml_file_and_environment_precedence(tmp_path, monkeypatch):
    config = tmp_path / "medcap.toml"
    config.write_text('dicom_port = 4000\nquiet_seconds = 12\nallowed_peers = "PACS@10.0.0.0/8"\n')
    monkeypatch.setenv("MEDCAP_QUIET_SECONDS", "7")
    s = load_settings(config)
    assert s.dicom_port == 4000 and s.quiet_seconds == 7
    assert s.allowed_peers == (AllowedPeer.parse("PACS@10.0.0.0/8"),)


def test_missing_or_malformed_config_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("dicom_port = = 1")
    with pytest.raises(SettingsError):
        load_settings(bad)


@pytest.mark.parametrize(
    ("entry", "calling", "address", "admitted"),
    [
        ("ORTHANC@127.0.0.1/32", "ORTHANC", "127.0.0.1", True),
        ("ORTHANC@127.0.0.1/32", "ORTHANC", "127.0.0.2", False),
        ("ORTHANC@127.0.0.1/32", "OTHER", "127.0.0.1", False),
        ("*@10.1.0.0/16", "ANY", "10.1.200.3", True),
        ("*@10.1.0.0/16", "ANY", "10.2.0.1", False),
        ("PACS@::1", "PACS", "::1", True),
        ("PACS@10.0.0.0/8", "PACS", "not-an-address", False),
    ],
)
def test_allowed_peer_matching(entry, calling, address, admitted):
    assert AllowedPeer.parse(entry).admits(calling, address) is admitted


def test_destinations_carry_the_dispatch_tls_settings(tmp_path, monkeypatch):
    ca_cert, _ = make_ca(tmp_path, "pacs-ca")
    monkeypatch.setenv("MEDCAP_DESTINATIONS", "ORTHANC@127.0.0.1:4242, PACS@[::1]:104")
    monkeypatch.setenv("MEDCAP_DISPATCH_TLS_CA_FILE", str(ca_cert))
    s = load_settings()
    assert [str(d) for d in s.destination_list] == ["ORTHANC@127.0.0.1:4242", "PACS@[::1]:104"]
    assert all(d.tls is not None and d.tls.ca_file == ca_cert for d in s.destination_list)
    # A stored destination no longer configured is still sent to, with today's TLS settings.
    assert s.destination("OLD@10.0.0.9:104").tls is not None


def test_retry_delay_doubles_up_to_the_cap(monkeypatch):
    monkeypatch.setenv("MEDCAP_RETRY_BASE_SECONDS", "2")
    monkeypatch.setenv("MEDCAP_RETRY_MAX_SECONDS", "10")
    s = load_settings()
    assert [s.retry_delay(n) for n in range(1, 6)] == [2, 4, 8, 10, 10]


@pytest.mark.parametrize(
    "value, message",
    [
        ("ftp://pacs/{study_uid}", "must start with http:// or https://"),
        ("https://pacs/viewer?uid={study}", r"unknown placeholders \['study'\]"),
    ],
)
def test_viewer_url_template_is_checked(monkeypatch, value, message):
    monkeypatch.setenv("MEDCAP_VIEWER_URL_TEMPLATE", value)
    with pytest.raises(SettingsError, match=message):
        load_settings()
    monkeypatch.setenv("MEDCAP_VIEWER_URL_TEMPLATE", "https://pacs/ohif/viewer?StudyInstanceUIDs={study_uid}&acc={accession_number}")
    assert load_settings().viewer_url_template.endswith("{accession_number}")
