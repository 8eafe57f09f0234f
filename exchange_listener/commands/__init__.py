"""One module per subcommand; each has ``add_arguments(parser)`` and ``run(args) -> int``."""
from __future__ import annotations

import argparse

from exchange_listener.core import config, logs


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML settings file (default: $EXCHANGE_LISTENER_CONFIG)")


def load_settings(args: argparse.Namespace) -> config.Settings:
    """Settings for a command, with logging configured from them."""
    settings = config.load(getattr(args, "config", None))
    logs.configure(settings.log_level, settings.log_format)
    return settings
