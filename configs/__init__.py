"""The built-in configs, installed as the package ``pipeline.configs`` (YAML package data).

``pipeline.config.builtin_configs`` reads them with :mod:`importlib.resources`.
"""
