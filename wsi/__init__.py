"""Whole-slide image access: reading, tissue masking, tile grids and Zarr tile stores.

This package knows nothing of torch; it turns slides into arrays and stores.
"""

__version__ = "0.1.0"
