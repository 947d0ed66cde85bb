"""The settings of the destinations besides C-STORE: validated at start-up, handed to their kinds."""

from __future__ import annotations

import pytest

from service import outputs
from service.settings import SettingsError, load_settings, parse_output_destinations


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("https://ris.example/fhir", "is not one of stow-rs\\+http://"),
        ("mllp://ris.example", "needs a host and a port"),
        ("fhir+https://user:pw@ris.example/fhir", "credentials go in stow_rs_authorization / fhir_authorization"),
        ("stow-rs+http://pacs:99999/dicom-web", "invalid port"),
        ("fhir+http://ris/fhir?x=1", "must not have a query"),
        ("mllp://ris:2575, mllp://ris:2575", "listed twice"),
    ],
)
def test_bad_output_destinations_stop_start_up_naming_the_setting(monkeypatch, value, message):
    monkeypatch.setenv("MEDCAP_OUTPUT_DESTINATIONS", value)
    with pytest.raises(SettingsError, match=f"MEDCAP_OUTPUT_DESTINATIONS.*{message}"):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEDCAP_FHIR_AUTHORIZATION", "s3cret", "MEDCAP_FHIR_AUTHORIZATION: .*Authorization header value"),
        ("MEDCAP_STOW_RS_AUTHORIZATION", "Bearer", "MEDCAP_STOW_RS_AUTHORIZATION"),
        ("MEDCAP_OUTPUT_TLS_CA_FILE", "/nonexistent/ca.pem", "output TLS file /nonexistent/ca.pem does not exist"),
        ("MEDCAP_OUTPUT_TLS_CERT_FILE", "/etc/hostname", "output_tls_cert_file and output_tls_key_file must be set together"),
        ("MEDCAP_HL7_SENDING_APPLICATION", "", "MEDCAP_HL7_SENDING_APPLICATION"),
    ],
)
def test_bad_credentials_and_tls_settings_name_the_setting(monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=message):
        load_settings()


def test_every_destination_goes_to_its_kind_and_secrets_stay_out_of_sight(monkeypatch):
    monkeypatch.setenv("MEDCAP_DESTINATIONS", "PACS@127.0.0.1:104")
    monkeypatch.setenv(
        "MEDCAP_OUTPUT_DESTINATIONS", "stow-rs+http://127.0.0.1:8042/dicom-web, mllp://127.0.0.1:2575,fhir+https://ris.example/fhir"
    )
    monkeypatch.setenv("MEDCAP_FHIR_AUTHORIZATION", "Bearer s3cret-token")
    monkeypatch.setenv("MEDCAP_HL7_RECEIVING_APPLICATION", "RIS")
    settings = load_settings()
    assert settings.dispatch_destinations == (
        "PACS@127.0.0.1:104",
        "stow-rs+http://127.0.0.1:8042/dicom-web",
        "mllp://127.0.0.1:2575",
        "fhir+https://ris.example/fhir",
    )
    kinds = outputs.configured(settings)
    assert [kinds.for_destination(d).name for d in settings.dispatch_destinations] == [
        "dicom-sr",
        "stow-rs",
        "hl7-oru",
        "fhir-diagnostic-report",
    ]
    fhir = kinds.get("fhir-diagnostic-report")
    assert isinstance(fhir, outputs.FhirReport) and fhir.peer.authorization == "Bearer s3cret-token"
    hl7 = kinds.get("hl7-oru")
    assert isinstance(hl7, outputs.Hl7Oru) and hl7.applications.receiving_application == "RIS"
    assert "s3cret" not in repr(settings), "the token is a secret: not in the settings' repr"
    assert parse_output_destinations("") == ()
