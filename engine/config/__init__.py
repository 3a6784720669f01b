"""The engine's part of config.toml, parsed once into frozen dataclasses."""
