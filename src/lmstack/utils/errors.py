"""The one exception type users see.

Library code raises `LmstackError` (or a subclass of `ValueError` where Python convention
expects one) with a message that names the problem and the fix. The CLI catches
`LmstackError` and prints it as one line, never a traceback.
"""


class LmstackError(Exception):
    """A user-facing error: bad input, a missing file, an impossible configuration."""
