"""What iftune's own studies print: `quiet()` keeps library chatter off the console."""

from __future__ import annotations

import contextlib
import io
import sys
import warnings
from collections.abc import Iterator


def silence_libraries() -> None:
    """No progress bars, info logs or FutureWarnings from transformers and datasets (for the
    rest of the process)."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    warnings.simplefilter("ignore", FutureWarning)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the libraries and hold back everything printed inside the block (a trainer logs
    every step); if the block fails, the last 4,000 characters are written to stderr first, so
    the failure comes with its context."""
    silence_libraries()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        sys.stderr.write(buffer.getvalue()[-4000:])
        raise
