"""The one exception type lowbit raises for bad input.

Every message is a single line that names the problem (the file, the tensor, the value) so that
the CLI can print it as-is and exit non-zero, without a traceback.
"""


class LowbitError(Exception):
    """Bad input or an unsupported request, described in one line."""
