"""The daemon's configuration: TOML in, typed and validated objects out.

schema.py holds the typed objects, parse.py reads a file into them (models.py
its [[models]] tables, reader.py the getters whose errors name the key). This
face hands on what the rest of mpsd uses.
"""

from mpsd.config.parse import load_config, parse_config
from mpsd.config.reader import split_listen
from mpsd.config.schema import (
    EMBEDDED_DEFAULT, EMBEDDED_SOURCE, Config, ConfigError, DaemonConfig, HttpLimits, MemoryConfig, ModelConfig,
    PublicAccess, RoutingThresholds)

__all__ = ["EMBEDDED_DEFAULT", "EMBEDDED_SOURCE", "Config", "ConfigError", "DaemonConfig", "HttpLimits",
           "MemoryConfig", "ModelConfig", "PublicAccess", "RoutingThresholds", "load_config", "parse_config",
           "split_listen"]
