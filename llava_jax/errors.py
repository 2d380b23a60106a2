"""The one exception type for user-facing failures, and how every CLI reports them.

Everything a user can get wrong (a missing file, a non-GGUF file, an unsupported architecture or
quant type, an unreadable image, a prompt longer than the context) raises `LlavaError` with a
message that fits on one line. The CLI turns it into one stderr line and a non-zero exit; so does
`run_cli` for what the environment gets wrong (an unreadable file, a closed output pipe, a device out
of memory).
"""

from __future__ import annotations


class LlavaError(Exception):
    """A user-facing error; `str(err)` is one line that says what is wrong and, if possible, what to do."""


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]


def is_out_of_memory(e: BaseException) -> bool:
    """An XLA runtime error (jaxlib's XlaRuntimeError / JaxRuntimeError) with status RESOURCE_EXHAUSTED.
    Decided by name, so that this module never imports jax."""
    names = {cls.__name__ for cls in type(e).__mro__}
    return bool(names & {"XlaRuntimeError", "JaxRuntimeError"}) and "RESOURCE_EXHAUSTED" in str(e)


def out_of_memory_message(e: BaseException) -> str:
    """One line for a device out-of-memory error: XLA's own first line without its status prefix."""
    text = _first_line(e).replace("RESOURCE_EXHAUSTED:", "").strip()
    return f"device out of memory: {text} (try a smaller -c, fewer / smaller images or --batch-size, or --dtype bf16)"


def os_error_message(e: OSError) -> str:
    """One line for an OSError that names a file (permission denied, I/O error, ...)."""
    reason = e.strerror or _first_line(e)
    return f"cannot read {e.filename}: {reason}"


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    import os
    import sys

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor behind sys.stdout
        pass


def run_cli(body, interrupted: str = "interrupted") -> int:
    """Run a CLI's body (a no-argument callable returning the exit status) the way every llava_jax
    command reports failure: one `error: ...` line on stderr and status 1 for a LlavaError, an OSError
    naming a file (e.g. permission denied), a closed output pipe (`| head`) or a device out of memory;
    Ctrl-C prints `interrupted` (one line) and returns 130. Anything else is a bug and keeps its traceback."""
    import sys

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1

    try:
        return body()
    except LlavaError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return fail("output closed early (broken pipe)")
    except OSError as e:
        if e.filename is None:
            raise
        return fail(os_error_message(e))
    except Exception as e:
        if is_out_of_memory(e):
            return fail(out_of_memory_message(e))
        raise
