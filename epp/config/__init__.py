"""Configuration: process settings and (later) the EndpointPickerConfig."""

from epp.config.settings import ConfigError, EppSettings

__all__ = ["ConfigError", "EppSettings"]
