"""Packed weight formats. Importing this package registers every format by name."""

from lowbit.formats.affine import AffineWeight  # noqa: F401
from lowbit.formats.int8 import Int8Weight  # noqa: F401
from lowbit.formats.nf4 import NF4Weight  # noqa: F401
