"""The error of a setting that cannot work, raised at every layer (a model family included) and caught by every
command: one line naming the key, the value and what is allowed."""


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and what is allowed."""
