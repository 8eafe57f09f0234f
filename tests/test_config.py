"""Settings fail at start with a message naming the key, never a traceback, and hide secrets."""
import subprocess
import sys

import pytest

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
