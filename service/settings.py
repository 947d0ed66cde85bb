"""The one settings object.

Values come, in increasing priority, from the defaults below, an optional TOML file
(``medcap --config FILE``; keys are the setting names without the ``MEDCAP_`` prefix, in
lower case) and environment variables prefixed ``MEDCAP_``. Every setting is documented in
the README; a bad value stops start-up with a message naming the setting.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
import string
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, cast
from urllib.parse import parse_qsl, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from dicom_io.ae_title import validate_ae_title
from dicom_io.store_scu import ClientTLS, Destination, parse_destinations
from service.storage import MB, Storage, StorageError

ENV_PREFIX = "MEDCAP_"
TEST_PREFIX = "MEDCAP_TEST_"  # reserved for the test suite's own variables


class SettingsError(ValueError):
    """A setting has a bad value; the message names the setting."""


@dataclass(frozen=True)
class AllowedPeer:
    """One allow-list entry: a calling AE title (``*`` for any) and the network it may call from."""

    ae_title: str
    network: ipaddress.IPv4Network | ipaddress.IPv6Network

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        ae, sep, net = text.strip().rpartition("@")
        if not sep or not ae or not net:
            raise ValueError(f"{text!r} is not of the form AE_TITLE@ADDRESS[/PREFIX] (use * for any AE title)")
        if ae != "*":
            ae = validate_ae_title(ae, "AE title")
        try:
            network = ipaddress.ip_network(net.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(f"{text!r}: {exc}") from None
        return cls(ae, network)

    def admits(self, calling_ae: str, address: str) -> bool:
        if self.ae_title != "*" and self.ae_title != calling_ae.strip():
            return False
        try:
            return ipaddress.ip_address(address) in self.network
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.network}"


class Settings(BaseSettings):
    """MedCap configuration. Field names map to ``MEDCAP_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    data_dir: Path = Field(Path("medcap-data"), description="Where received instances, quarantined input and the embedded databases live.")
    database_url: str = Field("", description="SQLAlchemy URL of the audit database; empty means SQLite under the data dir.")
    broker_url: str = Field("", description="Celery broker; empty means the embedded SQLite broker under the data dir.")
    dicom_ae_title: str = Field("MEDCAP", description="Our AE title; associations calling another title are rejected.")
    dicom_port: int = Field(11112, ge=1, le=65535, description="DICOM listener port.")
    dicom_bind_address: str = Field("0.0.0.0", description="Address the listener binds to.")
    allowed_peers: Annotated[tuple[AllowedPeer, ...], NoDecode] = Field(
        (), description="Comma-separated AE@CIDR pairs allowed to store; empty rejects everyone."
    )
    quiet_seconds: float = Field(30.0, gt=0, description="A study is stable after this long without new instances.")
    max_wait_seconds: float = Field(
        3600.0, gt=0, description="A study is processed at the latest this long after its first pending instance."
    )
    min_free_disk_mb: int = Field(1024, ge=0, description="New associations are refused, and instances failed, below this much free disk.")
    max_associations: int = Field(25, ge=1, le=1000, description="Concurrent associations the listener serves.")
    dicom_timeout_seconds: float = Field(60.0, gt=0, description="ACSE, DIMSE and network idle timeout of the listener.")
    max_pdu_bytes: int = Field(1048576, ge=0, description="Largest PDU we accept (0 = unlimited); larger PDUs mean fewer round trips.")
    tls_cert_file: Path | None = Field(None, description="PEM server certificate; enables DICOM TLS together with the key and CA.")
    tls_key_file: Path | None = Field(None, description="PEM private key of the server certificate.")
    tls_ca_file: Path | None = Field(None, description="PEM CA bundle that client certificates must chain to (required with TLS).")
    assembly_interval_seconds: float = Field(1.0, gt=0, description="How often the assembler looks for stable studies.")
    job_redeliver_seconds: float = Field(
        900.0, gt=0, description="A job enqueued this long without a worker starting it is enqueued again."
    )
    job_lease_seconds: float = Field(
        10.0,
        ge=1,
        le=3600,
        description="A running job's claim lasts this long unless its worker renews it "
        "(every third of it); a job whose worker died is taken over once it runs out.",
    )
    worker_concurrency: int = Field(1, ge=1, le=64, description="Worker processes started by `medcap serve` and `medcap worker`.")
    model: Path | None = Field(None, description="Captioner checkpoint directory (from `medcap model compose` or `medcap model demo`).")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$", description="Where caption workers run the model: auto, cpu, cuda or cuda:N."
    )
    generation_preset: str = Field(
        "fast", pattern=r"^(fast|paper)$", description="Caption decoding: fast (greedy) or paper (beam search as published)."
    )
    key_slices: int = Field(3, ge=1, le=64, description="Key slices captioned per series.")
    key_slice_strategy: str = Field("uniform", pattern=r"^(central|uniform|content)$", description="How key slices are chosen.")
    caption_batch_size: int = Field(8, ge=1, le=256, description="Images per forward pass of the model (a GPU: 32).")
    caption_studies_in_flight: int = Field(
        1,
        ge=1,
        le=64,
        description="Studies each caption worker captions at once, as threads sharing "
        "one model; their key images share batches (a GPU: 8).",
    )
    caption_batch_wait_ms: float = Field(
        25.0,
        ge=0,
        le=10000,
        description="With several studies in flight: how long a batch waits for more key images (up to the batch size) before it runs.",
    )
    torch_threads: int = Field(
        0, ge=0, le=256, description="CPU threads of each caption worker process (0: torch's default, one per core)."
    )
    job_time_limit_seconds: float = Field(600.0, gt=0, description="A caption job running longer is stopped and retried.")
    job_max_attempts: int = Field(3, ge=1, le=100, description="Attempts of a caption job before it ends as failed.")
    destinations: str = Field("", description="Comma-separated PACS that receive our SRs, as AE@host:port; empty keeps SRs local.")
    dispatch_tls_ca_file: Path | None = Field(None, description="PEM CA bundle to verify destinations with; enables TLS towards them.")
    dispatch_tls_cert_file: Path | None = Field(
        None, description="PEM client certificate presented to destinations (optional, with the key)."
    )
    dispatch_tls_key_file: Path | None = Field(None, description="PEM key of the client certificate.")
    dispatch_timeout_seconds: float = Field(30.0, gt=0, description="Network timeout of each step when sending an SR.")
    dispatch_max_attempts: int = Field(
        10, ge=1, le=1000, description="Sends of an SR to one destination before it ends as failed (resend with `medcap resend`)."
    )
    retry_base_seconds: float = Field(5.0, gt=0, description="First retry delay; doubled on each further attempt.")
    retry_max_seconds: float = Field(600.0, gt=0, description="Longest delay between retries.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port of `medcap listen`/`serve` (0: off).")
    worker_metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port of `medcap worker` (0: off).")
    web_port: int = Field(8080, ge=1, le=65535, description="Port of the review web app (`medcap web`, `medcap serve`).")
    web_bind_address: str = Field("127.0.0.1", description="Address the web app binds to; put it behind TLS before opening it up.")
    web_tls_cert_file: Path | None = Field(None, description="PEM certificate: the web app serves HTTPS itself (with the key).")
    web_tls_key_file: Path | None = Field(None, description="PEM key of the web app's certificate.")
    session_hours: float = Field(8.0, gt=0, le=24 * 7, description="A signed-in session ends this long after sign-in.")
    login_max_failures: int = Field(
        5, ge=1, le=1000, description="Failed sign-ins per user name or address in 15 minutes before sign-in is refused."
    )
    verifier_organization: str = Field(
        "MedCap", min_length=1, max_length=64, description="Verifying organization written into verified SRs."
    )
    routing_rules: Path | None = Field(
        None, description="TOML routing rules (docs/routing.md); unset: caption every CT and MR series with MEDCAP_MODEL."
    )
    # -- review page (issue 15) --
    viewer_url_template: str = Field(
        "",
        max_length=1000,
        description="Link to the site's own viewer (OHIF, PACS): an http(s) URL with {study_uid}, {accession_number}, {patient_id}; empty: no link.",
    )
    # -- report destinations other than a PACS (service/outputs: stow_rs, hl7_oru, fhir_report) --
    output_destinations: str = Field(
        "",
        description="Comma-separated destinations besides C-STORE: stow-rs+http(s)://host[:port]/dicomweb-root (the SR by STOW-RS), "
        "mllp://host:port or mllps://host:port (HL7 v2.5.1 ORU^R01), fhir+http(s)://host[:port]/fhir-base (FHIR R4 DiagnosticReport).",
    )
    output_tls_ca_file: Path | None = Field(
        None, description="PEM CA bundle that verifies https and mllps destinations (default: the system's CAs)."
    )
    output_tls_cert_file: Path | None = Field(None, description="PEM client certificate presented to https and mllps destinations.")
    output_tls_key_file: Path | None = Field(None, description="PEM key of that client certificate.")
    stow_rs_authorization: SecretStr | None = Field(
        None, description="Authorization header sent to STOW-RS destinations, e.g. 'Bearer TOKEN' or 'Basic BASE64'."
    )
    fhir_authorization: SecretStr | None = Field(
        None, description="Authorization header sent to FHIR destinations, e.g. 'Bearer TOKEN' or 'Basic BASE64'."
    )
    hl7_sending_application: str = Field("MEDCAP", min_length=1, max_length=227, description="MSH-3 of the ORU^R01 messages.")
    hl7_sending_facility: str = Field("MEDCAP", min_length=1, max_length=227, description="MSH-4 of the ORU^R01 messages.")
    hl7_receiving_application: str = Field("", max_length=227, description="MSH-5 of the ORU^R01 messages (the RIS).")
    hl7_receiving_facility: str = Field("", max_length=227, description="MSH-6 of the ORU^R01 messages.")
    fhir_report_identifier_system: str = Field(
        "urn:medcap:diagnostic-report",
        min_length=1,
        description="System of the DiagnosticReport identifier (its value: the Study Instance UID); the verified report updates the draft's resource under it.",
    )
    # DICOMweb in (STOW-RS on the web app; clients: `medcap dicomweb-client`)
    dicomweb_max_request_mb: int = Field(
        1024, ge=1, le=1024 * 1024, description="Largest STOW-RS request body (MiB); larger requests get 413, checked as the bytes arrive."
    )
    log_level: str = Field("INFO", pattern=r"^(DEBUG|INFO|WARNING|ERROR)$", description="Logging level.")
    # -- issue 12: the client address behind a reverse proxy; the ATNA audit copy ------------------
    web_trusted_proxies: Annotated[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode] = Field(
        (), description="Reverse proxies (addresses or networks) whose X-Forwarded-For names the client; empty: the header is ignored."
    )
    audit_syslog_url: str = Field(
        "",
        pattern=r"^$|^(tls|udp)://[^/\s]+:[0-9]{1,5}$",
        description="Audit repository for the IHE ATNA copy of the audit trail: tls://host:6514 (RFC 5425) or udp://host:514 (RFC 5426); empty: off.",
    )
    audit_syslog_ca_file: Path | None = Field(None, description="PEM CA bundle the audit repository's certificate must chain to (tls).")
    audit_syslog_cert_file: Path | None = Field(None, description="PEM client certificate for the audit repository (tls, with the key).")
    audit_syslog_key_file: Path | None = Field(None, description="PEM key of that certificate.")
    audit_source_id: str = Field("", max_length=64, description="AuditSourceID of our ATNA messages; empty: this host's name.")
    audit_syslog_retry_seconds: float = Field(
        5.0, gt=0, description="Delay before an audit message the repository did not take is sent again."
    )

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer_url_template(cls, value: str) -> str:
        if not value:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("viewer_url_template must start with http:// or https://")
        names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        unknown = names - {"study_uid", "accession_number", "patient_id"}
        if unknown:
            raise ValueError(
                f"viewer_url_template: unknown placeholders {sorted(unknown)}; use {{study_uid}}, {{accession_number}}, {{patient_id}}"
            )
        return value

    # -- listener hardening (service/pdu_guard.py, dicom_io/validation.py) --
    max_connections_per_address: int = Field(
        10, ge=1, le=1000, description="Concurrent DICOM connections one address may hold; more are closed at accept."
    )
    max_pending_connections: int = Field(
        32, ge=1, le=10000, description="Connections, all addresses together, that have not yet sent their association request."
    )
    request_timeout_seconds: float = Field(
        5.0, gt=0, le=600, description="A connection that sends no complete association request in this time is closed."
    )
    max_inflated_mb: int = Field(256, ge=1, le=65536, description="Largest a deflated dataset may inflate to; larger is refused (0xC210).")

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return validate_ae_title(value, "dicom_ae_title")

    @field_validator("destinations")
    @classmethod
    def _destinations(cls, value: str) -> str:
        parse_destinations(value)
        return value

    @field_validator("output_destinations")
    @classmethod
    def _output_destinations(cls, value: str) -> str:
        parse_output_destinations(value)
        return value

    @field_validator("stow_rs_authorization", "fhir_authorization")
    @classmethod
    def _authorization(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _AUTHORIZATION.match(value.get_secret_value()):
            raise ValueError("must be an Authorization header value: a scheme and its credentials, e.g. 'Bearer TOKEN'")
        return value

    @field_validator("allowed_peers", mode="before")
    @classmethod
    def _peers(cls, value: Any) -> tuple[AllowedPeer, ...]:
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        return tuple(v if isinstance(v, AllowedPeer) else AllowedPeer.parse(str(v)) for v in value)

    @field_validator("broker_url")
    @classmethod
    def _broker(cls, value: str) -> str:
        # kombu silently turns a rediss:// URL without ssl_cert_reqs into TLS that trusts any certificate.
        if value.startswith("rediss://"):
            query = dict(parse_qsl(urlsplit(value).query))
            if query.get("ssl_cert_reqs", "").lower() not in ("required", "cert_required") or not query.get("ssl_ca_certs"):
                raise ValueError(
                    "a rediss:// broker_url needs ?ssl_cert_reqs=required&ssl_ca_certs=/path/to/ca.pem (the broker's certificate is verified)"
                )
        return value

    @field_validator("web_trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        try:
            return tuple(ipaddress.ip_network(v, strict=False) for v in value)
        except ValueError as exc:
            raise ValueError(f"web_trusted_proxies: {exc} (use addresses or networks, e.g. 10.0.0.5,10.1.0.0/16)") from None

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.max_wait_seconds < self.quiet_seconds:
            raise ValueError("max_wait_seconds must be at least quiet_seconds")
        tls = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(tls) and not all(tls):
            raise ValueError("tls_cert_file, tls_key_file and tls_ca_file must be set together (client certificates are required with TLS)")
        for path in filter(None, tls):
            if not path.is_file():
                raise ValueError(f"TLS file {path} does not exist")
        if self.job_redeliver_seconds <= self.job_time_limit_seconds:
            raise ValueError(
                "job_redeliver_seconds must be longer than job_time_limit_seconds (an enqueued job is published again only once a worker that took it could have finished it)"
            )
        if (self.web_tls_cert_file is None) != (self.web_tls_key_file is None):
            raise ValueError("web_tls_cert_file and web_tls_key_file must be set together")
        if self.audit_syslog_url.startswith("tls://") and self.audit_syslog_ca_file is None:
            raise ValueError("audit_syslog_url tls:// needs audit_syslog_ca_file (the audit repository's certificate is verified)")
        if (self.audit_syslog_cert_file is None) != (self.audit_syslog_key_file is None):
            raise ValueError("audit_syslog_cert_file and audit_syslog_key_file must be set together")
        for path in filter(None, (self.audit_syslog_ca_file, self.audit_syslog_cert_file, self.audit_syslog_key_file)):
            if not path.is_file():
                raise ValueError(f"audit syslog TLS file {path} does not exist")
        if self.retry_max_seconds < self.retry_base_seconds:
            raise ValueError("retry_max_seconds must be at least retry_base_seconds")
        self.destination_list  # noqa: B018 -- parse now, so a bad destination or TLS file stops start-up
        output_tls = [self.output_tls_ca_file, self.output_tls_cert_file, self.output_tls_key_file]
        for path in filter(None, output_tls):
            if not path.is_file():
                raise ValueError(f"output TLS file {path} does not exist")
        if (self.output_tls_cert_file is None) != (self.output_tls_key_file is None):
            raise ValueError("output_tls_cert_file and output_tls_key_file must be set together")
        try:
            self.storage  # noqa: B018 -- a data_dir that is a file stops start-up
        except StorageError as exc:
            raise ValueError(f"data_dir: {exc}") from None
        if self.model is not None and not (self.model / "config.json").is_file():
            raise ValueError(f"model: {self.model} is not a MedCap checkpoint directory (no config.json)")
        if self.routing_rules is not None and not self.routing_rules.is_file():
            raise ValueError(f"routing_rules: file {self.routing_rules} does not exist")  # its content: service/routing.py, at start-up
        return self

    # Derived values: defaults that depend on the data dir.
    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'medcap.sqlite').resolve()}"

    @property
    def effective_broker_url(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def destination_list(self) -> tuple[Destination, ...]:
        tls = None
        if self.dispatch_tls_ca_file is not None:
            try:
                tls = ClientTLS(self.dispatch_tls_ca_file, self.dispatch_tls_cert_file, self.dispatch_tls_key_file)
            except ValueError as exc:
                raise ValueError(f"dispatch_tls: {exc}") from None
        elif self.dispatch_tls_cert_file or self.dispatch_tls_key_file:
            raise ValueError("dispatch_tls_cert_file/key_file need dispatch_tls_ca_file (the destinations' certificates must be verified)")
        try:
            return parse_destinations(self.destinations, tls=tls)
        except ValueError as exc:
            raise ValueError(f"destinations: {exc}") from None

    @property
    def dispatch_destinations(self) -> tuple[str, ...]:
        """Every destination a report is sent to, as dispatches record them: the PACS, then the others."""
        return tuple(str(d) for d in self.destination_list) + parse_output_destinations(self.output_destinations)

    def destination(self, text: str) -> Destination:
        """A stored destination string, with today's TLS settings."""
        for destination in self.destination_list:
            if str(destination) == text:
                return destination
        return Destination.parse(text, tls=self.destination_list[0].tls if self.destination_list else None)

    @property
    def dispatch_stale_seconds(self) -> float:
        """A send takes at most a few network timeouts (connect, associate, store, release)."""
        return max(60.0, 5 * self.dispatch_timeout_seconds)

    def retry_delay(self, attempts: int) -> float:
        """Exponential backoff after ``attempts`` failed attempts (1, 2, …)."""
        return float(min(self.retry_max_seconds, self.retry_base_seconds * 2 ** max(0, attempts - 1)))

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def storage(self) -> Storage:
        """The data directory's files (instances, reports, quarantine): built and opened only there."""
        return Storage(self.data_dir, min_free_bytes=self.min_free_disk_mb * MB)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML source reads ``toml_file`` from the model config; load_settings sets it.
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


_AUTHORIZATION = re.compile(r"^[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]* +\S.*$")
#: scheme -> whether it needs a port; the output kinds (service/outputs) parse the rest when they send
_OUTPUT_SCHEMES = {"stow-rs+http": False, "stow-rs+https": False, "fhir+http": False, "fhir+https": False, "mllp": True, "mllps": True}


def parse_output_destinations(text: str) -> tuple[str, ...]:
    """The comma-separated ``output_destinations``, each checked to be a URL of a known output scheme."""
    found: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        url = urllib.parse.urlsplit(part)
        if url.scheme not in _OUTPUT_SCHEMES:
            raise ValueError(f"{part!r} is not one of {', '.join(s + '://' for s in _OUTPUT_SCHEMES)}")
        if url.username or url.password:
            raise ValueError(f"{part!r}: credentials go in stow_rs_authorization / fhir_authorization, not in the URL")
        try:
            port = url.port
        except ValueError:
            raise ValueError(f"{part!r} has an invalid port") from None
        if not url.hostname or (_OUTPUT_SCHEMES[url.scheme] and port is None):
            raise ValueError(f"{part!r} needs a host{' and a port' if _OUTPUT_SCHEMES[url.scheme] else ''}")
        if url.query or url.fragment:
            raise ValueError(f"{part!r} must not have a query or fragment")
        if part in found:
            raise ValueError(f"{part!r} is listed twice")
        found.append(part)
    return tuple(found)


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Build the settings, raising :class:`SettingsError` that names the offending setting."""
    unknown_setting_check()
    cls = Settings
    if config_file is not None:
        if not config_file.is_file():
            raise SettingsError(f"--config: file {config_file} does not exist")
        cls = cast(type[Settings], type("Settings", (Settings,), {"model_config": {**Settings.model_config, "toml_file": config_file}}))
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    except ValueError as exc:  # e.g. malformed TOML
        raise SettingsError(f"configuration: {exc}") from None


def unknown_setting_check(environ: dict[str, str] | None = None) -> None:
    """A misspelt MEDCAP_ variable would otherwise be ignored in silence."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in Settings.model_fields}
    environ = dict(os.environ) if environ is None else environ
    for key in sorted(environ):
        if key.startswith(ENV_PREFIX) and key not in known and not key.startswith(TEST_PREFIX):
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SettingsError(f"unknown setting {key}{hint}")


def describe_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "configuration"
        name = f"{ENV_PREFIX}{field.upper()}" if field != "configuration" else field
        lines.append(f"invalid setting {name}: {err['msg']}")
    return "\n".join(lines)
