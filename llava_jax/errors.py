"""The one exception type for user-facing failures.

Everything a user can get wrong (a missing file, a non-GGUF file, an unsupported architecture or
quant type, an unreadable image, a prompt longer than the context) raises `LlavaError` with a
message that fits on one line. The CLI turns it into one stderr line and a non-zero exit.
"""


class LlavaError(Exception):
    """A user-facing error; `str(err)` is one line that says what is wrong and, if possible, what to do."""
