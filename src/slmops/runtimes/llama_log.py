"""llama.cpp's log lines: errors through, chatter dropped, unless SLMOPS_LLAMA_LOG=1.

Why a callback of our own: llama-cpp-python 0.3.36 installs one at import that maps ggml's log
levels with an outdated table (DEBUG=1 ... ERROR=4 in ggml.h since 2024, read there as
INFO=1 ... ERROR=3), so with ``verbose=False`` it prints llama.cpp's warnings (Gemma 3's
``llama_kv_cache_iswa: using full-size SWA cache`` on every load, tokenizer notes) and drops
its errors, the lines that say why a model failed to load. Every load site calls
`install_llama_log` before creating a ``llama_cpp.Llama``: it replaces that callback with one
that writes ERROR lines (and their continuations) to stderr, where the evaluate harness
captures a child's stderr tail for its error rows, and keeps the last few so a load failure can
quote them (`take_errors`). With SLMOPS_LLAMA_LOG=1 every line goes through, as llama.cpp
prints it without a callback.

The ctypes callback object is held at module level for the life of the process: llama.cpp
keeps the bare function pointer, and a collected callback is a crash on the next log line.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from collections import deque
from typing import Any

LOG_ENV = "SLMOPS_LLAMA_LOG"
"""Set to 1 to see all of llama.cpp's log lines (info, warnings, debug) on stderr."""

# enum ggml_log_level in ggml.h (the pinned build): NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4,
# CONT 5 (continues the previous line's level)
_ERROR, _CONT = 4, 5
_KEEP_ERRORS = 16

_lock = threading.Lock()
_callback: Any = None  # the installed ctypes callback: referenced here so it is never collected
_verbose = False
_last_level = 0
_errors: deque[str] = deque(maxlen=_KEEP_ERRORS)
_stderr_fd = 2  # a duplicate of fd 2 once installed (see install_llama_log)


def verbose_from_env() -> bool:
    """True when SLMOPS_LLAMA_LOG asks for every llama.cpp line (1, true, yes, on)."""
    return os.environ.get(LOG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _on_log(level: int, text: bytes | None, _user_data: Any) -> None:
    """Called by llama.cpp for every log fragment, on whichever thread logged it."""
    global _last_level
    if text is None:
        return
    effective = _last_level if level == _CONT else level
    if level != _CONT:
        _last_level = level
    if effective == _ERROR:
        _errors.append(text.decode("utf-8", errors="replace").rstrip("\n"))
    if _verbose or effective == _ERROR:
        with contextlib.suppress(OSError):  # a closed stderr must not crash a load
            os.write(_stderr_fd, text)


def install_llama_log(*, verbose: bool | None = None) -> None:
    """Route llama.cpp's log through `_on_log` (once per process; later calls only set verbosity).

    `verbose` None reads SLMOPS_LLAMA_LOG. Imports llama_cpp, so call it where a model is
    about to be loaded, never at module import (the agent imports this package eagerly).
    """
    global _callback, _verbose, _stderr_fd
    _verbose = verbose_from_env() if verbose is None else verbose
    with _lock:
        if _callback is not None:
            return
        import llama_cpp

        # llama-cpp-python points fd 2 at /dev/null around model loads when verbose=False; a
        # duplicate taken now still reaches the real stderr (a file the harness reads, a tty)
        try:
            _stderr_fd = os.dup(2)
        except OSError:
            _stderr_fd = 2

        # importing llama_cpp installed llama-cpp-python's own callback; this one replaces it
        _callback = llama_cpp.llama_log_callback(_on_log)
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))


def take_errors() -> list[str]:
    """llama.cpp's ERROR lines since the last call (at most the last 16), oldest first."""
    with _lock:
        lines = [line for line in _errors if line.strip()]
        _errors.clear()
    return lines
