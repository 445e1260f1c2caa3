"""Packed weight formats. Importing this package registers every format by name."""

from lowbit.formats.affine import AffineWeight  # noqa: F401
