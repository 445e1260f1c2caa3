"""lowbit's version: one line, importable by every module without importing the package's __init__."""

__version__ = "0.1.0"
