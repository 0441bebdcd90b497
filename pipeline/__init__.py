"""Pipeline stages, configuration and the ``wsi-pipeline`` command line."""

from wsi import __version__

__all__ = ["__version__"]
