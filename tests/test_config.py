"""Settings fail at start with a message naming the key, never a traceback, and hide secrets."""
import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from emulators.ews import validation
from emulators.services import service_env
from exchange_listener import cli
from exchange_listener.core import config


def test_defaults_load_without_file():
    settings = config.load(env={})
    assert settings.queue_name == "exchange-listener"
    assert settings.group_size == 200
    assert settings.verify_tls is True


def test_file_then_environment_override(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('group_size = 50\nqueue_name = "q1"\n')
    settings = config.load(str(path), env={"EXCHANGE_LISTENER_GROUP_SIZE": "10"})
    assert settings.group_size == 10
    assert settings.queue_name == "q1"


@pytest.mark.parametrize(
    "env, key",
    [
        ({"EXCHANGE_LISTENER_GROUP_SIZE": "201"}, "group_size"),
        ({"EXCHANGE_LISTENER_GROUP_SIZE": "lots"}, "group_size"),
        ({"EXCHANGE_LISTENER_AUTH_TYPE": "kerberos"}, "auth_type"),
        ({"EXCHANGE_LISTENER_VERIFY_TLS": "perhaps"}, "verify_tls"),
        ({"EXCHANGE_LISTENER_CONNECTION_TIMEOUT": "31"}, "connection_timeout"),
        ({"EXCHANGE_LISTENER_REDIS_URL": "localhost:6379"}, "redis_url"),
        ({"EXCHANGE_LISTENER_EWS_URL": "https://mail.example.com/EWS/Exchange.asmx"}, "ews_username"),
        ({"EXCHANGE_LISTENER_EWS_URL": "https://m.example.com/EWS/Exchange.asmx", "EXCHANGE_LISTENER_AUTH_TYPE": "oauth2"}, "client_id"),
    ],
)
def test_bad_value_names_the_key(env, key):
    with pytest.raises(config.ConfigError) as err:
        config.load(env=env)
    assert str(err.value).startswith(key)


def test_unknown_key_in_file_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('gruop_size = 5\n')
    with pytest.raises(config.ConfigError, match="gruop_size"):
        config.load(str(path), env={})


def test_secrets_hidden_in_repr():
    settings = config.load(env={"EXCHANGE_LISTENER_EWS_PASSWORD": "hunter2-secret",
                                "EXCHANGE_LISTENER_REDIS_URL": "redis://:redispw@127.0.0.1:1/0"})
    assert "hunter2-secret" not in repr(settings)
    assert "redispw" not in repr(settings)


def test_cli_reports_config_error_without_traceback(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("group_size = 0\n")
    proc = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "mailboxes", "list", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "group_size" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("env", "message"), [
    ({"EXCHANGE_LISTENER_REDIS_ULR": "redis://10.0.0.9:6379/0"},
     "EXCHANGE_LISTENER_REDIS_ULR is not a setting (did you mean EXCHANGE_LISTENER_REDIS_URL?)"),
    ({"EXCHANGE_LISTENER_CONFIG_FILE": "/etc/el.toml"},
     "EXCHANGE_LISTENER_CONFIG_FILE is not a setting (did you mean EXCHANGE_LISTENER_CONFIG?)"),
    ({"exchange_listener_queue_name": "q"},
     "exchange_listener_queue_name is not a setting (did you mean EXCHANGE_LISTENER_QUEUE_NAME?)"),
    ({"EXCHANGE_LISTENER_FROBNICATE": "1"}, "EXCHANGE_LISTENER_FROBNICATE is not a setting (see docs/configuration.md)"),
])
def test_unknown_environment_variable_is_an_error_naming_the_closest_setting(env, message):
    with pytest.raises(config.ConfigError) as err:
        config.load(env=env)
    assert str(err.value) == message


def test_variables_kubernetes_and_docker_set_for_a_service_named_exchange_listener_are_not_typos():
    """A Service "exchange-listener" (say, for metrics) puts these in every pod of the namespace."""
    links = {"EXCHANGE_LISTENER_SERVICE_HOST": "10.0.0.7", "EXCHANGE_LISTENER_SERVICE_PORT": "9100",
             "EXCHANGE_LISTENER_SERVICE_PORT_METRICS": "9100", "EXCHANGE_LISTENER_PORT": "tcp://10.0.0.7:9100",
             "EXCHANGE_LISTENER_PORT_9100_TCP": "tcp://10.0.0.7:9100", "EXCHANGE_LISTENER_PORT_9100_TCP_PROTO": "tcp",
             "EXCHANGE_LISTENER_PORT_9100_TCP_PORT": "9100", "EXCHANGE_LISTENER_PORT_9100_TCP_ADDR": "10.0.0.7"}
    assert config.load(env=links).queue_name == config.default("queue_name")
    with pytest.raises(config.ConfigError, match="EXCHANGE_LISTENER_PORTS is not a setting"):
        config.load(env={**links, "EXCHANGE_LISTENER_PORTS": "1"})
    # a bare port meant as metrics_port is a typo, not a link (a link's value is tcp://host:port)
    with pytest.raises(config.ConfigError, match="EXCHANGE_LISTENER_PORT is not a setting"):
        config.load(env={"EXCHANGE_LISTENER_PORT": "9100"})


@pytest.mark.parametrize("missing, message", [
    ({"client_id": ""}, "client_id: required"),
    ({"client_secret": ""}, "needs client_secret or client_certificate_file"),
    ({"tenant_id": ""}, "tenant_id: required"),
    ({"notification_url": ""}, "needs notification_url"),
])
def test_a_graph_listener_without_what_it_needs_is_refused_naming_it(missing, message):
    whole = {"source": "graph", "client_id": "app", "client_secret": "s3cret", "tenant_id": "contoso",
             "notification_url": "https://hooks.example.com/graph/notify"}
    assert config.load(env={}, overrides=whole).source == "graph"
    with pytest.raises(config.ConfigError, match=message):
        config.load(env={}, overrides={**whole, **missing})
    # a certificate instead of the secret, a token URL instead of the tenant: both fine
    config.load(env={}, overrides={**whole, "client_secret": "", "client_certificate_file": "/etc/el/app.pem",
                                   "tenant_id": "", "token_url": "https://login.example/t/oauth2/v2.0/token"})


def test_typo_in_environment_stops_a_command_before_it_touches_redis(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(config.ENV_PREFIX)}
    env["EXCHANGE_LISTENER_REDIS_ULR"] = "redis://127.0.0.1:1/0"
    proc = subprocess.run([sys.executable, "-m", "exchange_listener.cli", "status"], env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean EXCHANGE_LISTENER_REDIS_URL?" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_in_file_or_arguments_names_the_closest_key(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('redis_ulr = "redis://10.0.0.9:6379/0"\n')
    with pytest.raises(config.ConfigError, match=r"^redis_ulr in .*c\.toml is not a setting \(did you mean redis_url\?\)$"):
        config.load(str(path), env={})
    settings = config.load(env={})
    with pytest.raises(config.ConfigError, match=r"^grup_size \(an argument\) is not a setting \(did you mean group_size\?\)"):
        settings.replace(grup_size=3)


def test_documented_other_variables_are_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('queue_name = "from-file"\n')
    env = {config.CONFIG_ENV: str(path), "EXCHANGE_LISTENER_EMULATOR_SCHEMA_LOG": str(tmp_path / "schema.log")}
    assert config.load(env=env).queue_name == "from-file"
    assert validation.ENV_VAR in config.OTHER_ENV  # the emulator's own variable is one of them


def test_the_test_suites_own_environments_are_accepted():
    """What conftest leaves in this process (the schema-violation file) and what the suite gives
    listeners and workers (service_env, with settings) must load."""
    assert validation.ENV_VAR in os.environ
    config.load()
    config.load(env=service_env("redis://127.0.0.1:1/0", "http://127.0.0.1:9/EWS/Exchange.asmx",
                                heartbeat_seconds=1, lease_seconds=3, listener_id="l1"))


def _setting_defaults_in_parsers():
    """(command, dest, default) for every command-line option named like a setting."""
    found = []

    def walk(command, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    walk(command, sub)
            elif action.dest in config.FIELD_BY_KEY:
                found.append((command, action.dest, action.default))

    for name in cli.COMMANDS:
        walk(name, cli.build_parser(name)._subparsers._group_actions[0].choices[name])
    return found


# options named like a setting that are not that setting: the emulators load no settings and stay
# quiet unless asked; the Salesforce emulator's --client-id names the connected apps it accepts
NOT_THE_SETTING = {("emulator", "log_level"), ("salesforce-emulator", "log_level"),
                   ("salesforce-emulator", "client_id")}


def test_command_line_defaults_are_the_tables():
    found = [item for item in _setting_defaults_in_parsers() if item[:2] not in NOT_THE_SETTING]
    assert ("emulator", "heartbeat_seconds", config.default("heartbeat_seconds")) in found
    assert [item for item in found if item[2] != config.default(item[1])] == []


def test_help_shows_the_tables_default(monkeypatch):
    field = config.FIELD_BY_KEY["heartbeat_seconds"]
    monkeypatch.setitem(config.FIELD_BY_KEY, "heartbeat_seconds", dataclasses.replace(field, default=12.5))
    text = cli.build_parser("emulator")._subparsers._group_actions[0].choices["emulator"].format_help()
    assert "(default 12.5)" in " ".join(text.split())
