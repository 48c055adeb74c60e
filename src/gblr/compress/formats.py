"""The names of a `gblr.save_pretrained` folder: its weights file's format tag and
version and its files' names. Here, below both, so that the configs
(`ConversionConfig.from_file`) read such a folder without importing the module that
writes it."""

from __future__ import annotations

__all__ = ["CONFIG_NAME", "FORMAT", "FORMAT_VERSION", "GENERATION_CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT = "gblr.pretrained"
FORMAT_VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
