"""The one exception type for user-facing failures.

Everything a user can get wrong (a missing file, a non-GGUF file, an unsupported architecture or
quant type, an unreadable image, a prompt longer than the context) raises `LlavaError` with a
message that fits on one line. The CLI turns it into one stderr line and a non-zero exit.
"""


class LlavaError(Exception):
    """A user-facing error; `str(err)` is one line that says what is wrong and, if possible, what to do."""


def run_cli(body, interrupted: str = "interrupted") -> int:
    """Run a CLI's body (a no-argument callable returning the exit status) the way every llava_jax
    command reports failure: a LlavaError is one `error: ...` line on stderr and status 1; Ctrl-C
    prints `interrupted` (one line) and returns 130. Anything else is a bug and keeps its traceback."""
    import sys

    try:
        return body()
    except LlavaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
