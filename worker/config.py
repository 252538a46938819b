"""Settings, read from environment variables (and a mounted secret file) by pydantic-settings.

Every field is one environment variable of the same name in upper case, e.g. ``vapi_base_url`` is
``VAPI_BASE_URL``. Durations carry their unit in the name. The README's configuration table lists
them all; a test keeps that table, the k8s manifests and this model in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from worker.errors import ConfigError

#: Where the real API lives; the default when VAPI_API_KEY is given.
VAPI_PUBLIC_URL = "https://api.vapi.ai"


class Settings(BaseSettings):
    """All of the worker's configuration."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Kafka
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    worker_app_id: str = "vapi-stream-worker"
    topic_requests: str = "chat.requests"
    topic_deltas: str = "chat.deltas"
    topic_responses: str = "chat.responses"
    topic_dlq: str = "chat.requests.dlq"
    topic_partitions: int = Field(default=8, ge=1)
    topic_replication_factor: int = Field(default=1, ge=1)

    # Vapi
    vapi_base_url: str | None = None
    vapi_api_key: SecretStr | None = None
    vapi_api_key_file: Path | None = None
    vapi_assistant_id: str | None = None
    # Comma-separated in the environment (``a1,a2``), not JSON.
    vapi_assistant_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    vapi_context_mode: Literal["previous_chat_id", "session_id"] = "previous_chat_id"
    vapi_connect_timeout_s: float = Field(default=5.0, gt=0)
    vapi_first_delta_timeout_s: float = Field(default=30.0, gt=0)
    vapi_stall_timeout_s: float = Field(default=20.0, gt=0)
    vapi_request_timeout_s: float = Field(default=120.0, gt=0)
    vapi_request_deadline_s: float = Field(default=300.0, gt=0)
    vapi_max_connections: int = Field(default=512, ge=1)
    # Limits of the whole fleet, split by request partition (worker.fleet_shares); 0 = off.
    vapi_global_max_in_flight: int = Field(default=0, ge=0)
    vapi_global_requests_per_minute: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    vapi_fetch_chat: bool = True

    # Retries
    retry_max_attempts: int = Field(default=5, ge=1)
    retry_base_delay_s: float = Field(default=0.5, ge=0)
    retry_max_delay_s: float = Field(default=20.0, ge=0)
    retry_after_max_s: float = Field(default=60.0, gt=0, allow_inf_nan=False)

    # Concurrency
    worker_max_in_flight: int = Field(default=256, ge=1)
    worker_max_buffered: int = Field(default=1024, ge=1)
    worker_delta_coalesce_ms: int = Field(default=0, ge=0)
    worker_delta_coalesce_chars: int = Field(default=0, ge=0)
    worker_completed_ids_kept: int = Field(default=64, ge=1)
    worker_shutdown_grace_s: float = Field(default=25.0, gt=0)
    worker_rebalance_grace_s: float = Field(default=3.0, ge=0)
    worker_finish_timeout_s: float = Field(default=5.0, gt=0)

    # Conversation state
    worker_conversation_ttl_s: float = Field(default=604_800.0, gt=0)
    #: Seconds a table recovery may go without progress before the process exits (0: never).
    worker_recovery_stall_s: float = Field(default=60.0, ge=0, allow_inf_nan=False)

    # What is paid for
    worker_request_max_age_s: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    worker_conversation_budget_usd: float = Field(default=0.0, ge=0, allow_inf_nan=False)

    # Input and output limits
    max_input_chars: int = Field(default=32_000, ge=1)
    max_metadata_bytes: int = Field(default=16_384, ge=0)
    max_reply_chars: int = Field(default=100_000, ge=1)

    # Operations
    worker_http_port: int = Field(default=6066, ge=0, le=65535)
    log_level: str = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"

    # The browser gateway (``vapi-worker gateway``)
    gateway_host: str = "0.0.0.0"
    gateway_port: int = Field(default=8080, ge=0, le=65535)
    gateway_secret: SecretStr | None = None
    gateway_demo: bool = False
    gateway_client_queue: int = Field(default=1000, ge=1)
    gateway_resume_lookback_s: float = Field(default=300.0, ge=0, allow_inf_nan=False)
    gateway_resume_max_records: int = Field(default=100_000, ge=1)

    # The embedded simulator (used when no VAPI_API_KEY is set and no VAPI_BASE_URL is given)
    simulator_api_key: SecretStr = SecretStr("sim-key")
    simulator_inter_token_delay_s: float = Field(default=0.03, ge=0)
    simulator_first_token_latency_s: float = Field(default=0.2, ge=0)

    @field_validator("vapi_assistant_allowlist", mode="before")
    @classmethod
    def _split_allowlist(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    #: True once vapi_api_key came from VAPI_API_KEY_FILE. An after-validator may run twice on
    #: one instance (model_validate of a BaseSettings does), so the check must know its own work.
    _key_from_file: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _read_key_file(self) -> Settings:
        if self.vapi_api_key_file is None or self._key_from_file:
            return self
        if self.vapi_api_key is not None:
            raise ConfigError(
                "VAPI_API_KEY and VAPI_API_KEY_FILE are both set: set only one of them"
            )
        try:
            key = self.vapi_api_key_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"cannot read VAPI_API_KEY_FILE: {exc.strerror}") from exc
        self.vapi_api_key = SecretStr(key)
        self._key_from_file = True
        return self

    @model_validator(mode="after")
    def _check_global_limit(self) -> Settings:
        limit = self.vapi_global_max_in_flight
        if 0 < limit < self.topic_partitions:
            raise ConfigError(
                f"VAPI_GLOBAL_MAX_IN_FLIGHT ({limit}) is below TOPIC_PARTITIONS "
                f"({self.topic_partitions}): the limit is split by request partition, so some "
                "partitions would get no stream at all; set it to 0 (off) or at least "
                f"{self.topic_partitions}"
            )
        return self

    def secrets(self) -> list[SecretStr]:
        """Every ``SecretStr`` setting that is set, whatever its name: what logs must never show."""
        values = (getattr(self, name) for name in type(self).model_fields)
        return [value for value in values if isinstance(value, SecretStr)]

    def default_assistant_id(self) -> str:
        """The assistant for requests that name none; required when a real Vapi is configured."""
        if self.vapi_assistant_id:
            return self.vapi_assistant_id
        if self.uses_embedded_simulator:
            return "sim-assistant"
        raise ConfigError("VAPI_ASSISTANT_ID is required when VAPI_API_KEY or VAPI_BASE_URL is set")

    @property
    def uses_embedded_simulator(self) -> bool:
        """True when neither a key nor a base URL points the worker at a real Vapi."""
        return self.vapi_api_key is None and self.vapi_base_url is None

    def effective_vapi_base_url(self) -> str:
        """The base URL to call when the embedded simulator is not in use."""
        return (self.vapi_base_url or VAPI_PUBLIC_URL).rstrip("/")


def setting_default(name: str) -> Any:
    """The default of the setting ``name`` (a ``Settings`` field), for code that offers the same
    default outside ``Settings`` (a CLI option, a class built without settings): taken from here,
    never copied, so that the two cannot drift apart."""
    return Settings.model_fields[name].get_default(call_default_factory=True)
