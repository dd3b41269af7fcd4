"""The first screen is ours: TensorFlow loaded with its known start-up notices filtered out.

What this module teaches:
- TensorFlow 2.21 prints, on import and whatever TF_CPP_MIN_LOG_LEVEL says, absl's preamble
  ("WARNING: All log messages before absl::InitializeLog() ...") and oneDNN's notice ("oneDNN
  custom operations are on ..."), from C++ before Python can set anything. They come twice in one
  process: libtensorflow_framework.so prints them, then the profiler's extension
  (tensorflow/python/profiler/internal/_pywrap_profiler_plugin.so, loaded by `import tensorflow`
  for tf.profiler) carries its own copy of the same code and prints them again;
- so they are filtered where they are written, at the file descriptor: while TensorFlow loads, fd 2
  goes into a pipe read by a small process of its own that drops the lines of NOTICES and forwards
  every other line untouched, at once. A real load error (a missing library, an illegal
  instruction, a crash inside the import) still shows, even if this process dies: the filter
  outlives it and forwards what it had.

A script imports this module first (`from tp4 import startup`, before anything that loads
TensorFlow): the one module of the package that acts when imported, because the notices come from
the import itself. It then sets TF_CPP_MIN_LOG_LEVEL=1 (TensorFlow's later INFO lines off,
warnings kept) unless it is set, and loads TensorFlow; where TensorFlow is already loaded, it does
nothing.
"""

import contextlib
import importlib
import os
import subprocess
import sys

# TensorFlow's start-up notices, one regular expression per line: INFO lines only, so that a
# warning or an error of the same sources still shows.
NOTICES = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\. .*",
    r"I\d{4} [\d:.]+ +\d+ cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized .*",
    r"To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler "
    r"flags\.",
)
# The filter process: stdin to stdout line by line, flushed, without the lines matching argv[1].
_FILTER = """
import re, sys
notice = re.compile(sys.argv[1].encode())
for line in sys.stdin.buffer:
    if not notice.fullmatch(line.rstrip(b"\\r\\n")):
        sys.stdout.buffer.write(line)
        sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def filtered_stderr(patterns=NOTICES):
    """Inside the block, the lines written to file descriptor 2 (by Python or by C++) that match
    one of `patterns` whole are dropped; every other line reaches stderr untouched, in order.
    Leaving the block waits until the filter has forwarded everything.

    Args:
        patterns: regular expressions, each matched against a whole line (without its newline).
    """
    sys.stderr.flush()
    stderr = os.dup(2)
    notice = "|".join(f"(?:{pattern})" for pattern in patterns)
    read, write = os.pipe()
    try:
        # -I: the filter imports nothing of the user's (no PYTHONPATH, no site-packages).
        forwarder = subprocess.Popen(
            [sys.executable, "-I", "-c", _FILTER, notice],
            stdin=read,
            stdout=stderr,
            stderr=stderr,
        )
    except OSError:  # no interpreter to start (an embedded Python): nothing filtered
        for descriptor in (read, write, stderr):
            os.close(descriptor)
        yield
        return
    os.close(read)
    os.dup2(write, 2)
    os.close(write)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(stderr, 2)  # the pipe's last writer closed: the filter reads to the end and stops
        os.close(stderr)
        forwarder.wait()


def load_tensorflow() -> None:
    """Import TensorFlow with its start-up notices filtered, TF_CPP_MIN_LOG_LEVEL=1 unless set;
    nothing if it is loaded already."""
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    with filtered_stderr():
        importlib.import_module("tensorflow")


# This module's purpose: see the docstring.
load_tensorflow()
