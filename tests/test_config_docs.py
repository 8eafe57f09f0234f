"""The configuration reference and the example file list every key the code knows."""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import gen_config_docs

from exchange_listener.core import config


def test_reference_is_current():
    assert (ROOT / "docs" / "configuration.md").read_text() == gen_config_docs.markdown(), \
        "run python tools/gen_config_docs.py"


def test_example_file_is_current_and_loads(tmp_path):
    text = (ROOT / "deploy" / "exchange-listener.example.toml").read_text()
    assert text == gen_config_docs.example_toml(), "run python tools/gen_config_docs.py"
    path = tmp_path / "example.toml"
    path.write_text(text)
    settings = config.load(str(path), env={})
    assert settings.values == config.load(env={}).values
