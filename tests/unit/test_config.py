"""Settings: the Vapi key from a mounted file, kept secret, clear errors for bad values, and the
defaults that code outside Settings offers for the same thing."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import pytest
from pydantic import ValidationError

from bench import scenarios, table_recovery
from worker.config import Settings, setting_default
from worker.errors import ConfigError
from worker.ops_http import OpsServer
from worker.retry import RetryPolicy
from worker.simulator.cli import add_arguments
from worker.simulator.config import SimulatorConfig
from worker.vapi.client import VapiClient

pytestmark = pytest.mark.unit


def test_the_key_is_read_from_a_mounted_file_and_never_printed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VAPI_API_KEY_FILE supplies the key (trailing newline dropped); repr and dumps hide it."""
    key_file = tmp_path / "vapi-key"
    key_file.write_text("sk-live-secret-123\n")
    monkeypatch.delenv("VAPI_API_KEY", raising=False)
    monkeypatch.setenv("VAPI_API_KEY_FILE", str(key_file))
    settings = Settings()
    assert settings.vapi_api_key is not None
    assert settings.vapi_api_key.get_secret_value() == "sk-live-secret-123"
    assert "sk-live-secret-123" not in repr(settings)
    assert "sk-live-secret-123" not in settings.model_dump_json()
    assert not settings.uses_embedded_simulator


def test_an_unreadable_key_file_is_a_clear_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key file that does not exist stops start-up with a message naming the setting."""
    monkeypatch.delenv("VAPI_API_KEY", raising=False)
    monkeypatch.setenv("VAPI_API_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises((ConfigError, ValidationError), match="VAPI_API_KEY_FILE"):
        Settings()


def test_a_key_and_a_key_file_at_once_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VAPI_API_KEY and VAPI_API_KEY_FILE together are ambiguous: start-up stops, naming both."""
    key_file = tmp_path / "vapi-key"
    key_file.write_text("sk-from-the-file\n")
    monkeypatch.setenv("VAPI_API_KEY", "sk-from-the-env")
    monkeypatch.setenv("VAPI_API_KEY_FILE", str(key_file))
    with pytest.raises((ConfigError, ValidationError)) as raised:
        Settings()
    assert "VAPI_API_KEY and VAPI_API_KEY_FILE" in str(raised.value)
    assert "sk-from" not in str(raised.value)


def test_a_real_vapi_needs_an_assistant_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a key but no VAPI_ASSISTANT_ID, asking for the default assistant is an error."""
    monkeypatch.setenv("VAPI_API_KEY", "k")
    monkeypatch.delenv("VAPI_ASSISTANT_ID", raising=False)
    with pytest.raises(ConfigError, match="VAPI_ASSISTANT_ID"):
        Settings().default_assistant_id()


def test_the_allowlist_is_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    """VAPI_ASSISTANT_ALLOWLIST='a, b,,c' is the list a, b, c."""
    monkeypatch.setenv("VAPI_ASSISTANT_ALLOWLIST", "a, b,,c")
    assert Settings().vapi_assistant_allowlist == ["a", "b", "c"]


def test_a_bad_number_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """WORKER_MAX_IN_FLIGHT=0 is refused with the field's name in the message."""
    monkeypatch.setenv("WORKER_MAX_IN_FLIGHT", "0")
    with pytest.raises(ValidationError, match="worker_max_in_flight"):
        Settings()


def test_the_recovery_stall_time_is_60_s_0_turns_it_off_and_below_0_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().worker_recovery_stall_s == 60.0
    monkeypatch.setenv("WORKER_RECOVERY_STALL_S", "0")
    assert Settings().worker_recovery_stall_s == 0.0
    monkeypatch.setenv("WORKER_RECOVERY_STALL_S", "2.5")
    assert Settings().worker_recovery_stall_s == 2.5
    for bad in ("-1", "nan", "inf", "soon"):
        monkeypatch.setenv("WORKER_RECOVERY_STALL_S", bad)
        with pytest.raises(ValidationError, match="worker_recovery_stall_s"):
            Settings()


def test_validating_settings_twice_keeps_the_key_from_the_file(tmp_path: Path) -> None:
    """model_validate runs a BaseSettings' after-validators twice on one instance; the key read
    from the file on the first run is not then taken for a second, conflicting source."""
    key_file = tmp_path / "vapi-key"
    key_file.write_text("sk-from-the-file\n")
    settings = Settings.model_validate({"vapi_api_key_file": str(key_file)})
    assert settings.vapi_api_key is not None
    assert settings.vapi_api_key.get_secret_value() == "sk-from-the-file"


def _parameter_default(function: object, name: str) -> object:
    return inspect.signature(function).parameters[name].default  # type: ignore[arg-type]


def test_defaults_offered_outside_settings_are_the_settings_own() -> None:
    """A CLI option or a class built without settings defaults to what the setting defaults to."""
    defaults = Settings.model_construct()  # the declared defaults, whatever the environment says
    simulator = SimulatorConfig()
    assert simulator.api_key == defaults.simulator_api_key.get_secret_value()
    assert simulator.first_token_latency_s == defaults.simulator_first_token_latency_s
    assert simulator.inter_token_delay_s == defaults.simulator_inter_token_delay_s
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args([]).api_key == defaults.simulator_api_key.get_secret_value()
    assert _parameter_default(OpsServer, "port") == defaults.worker_http_port
    assert RetryPolicy(1, 0, 0).retry_after_max_s == defaults.retry_after_max_s
    assert _parameter_default(VapiClient, "max_connections") == defaults.vapi_max_connections
    assert table_recovery._parser().parse_args([]).partitions == defaults.topic_partitions
    assert scenarios.PACED.partitions == scenarios.FAST.partitions == defaults.topic_partitions


def test_a_default_of_no_setting_is_an_error() -> None:
    with pytest.raises(KeyError):
        setting_default("no_such_setting")
