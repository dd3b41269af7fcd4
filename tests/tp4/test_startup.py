"""tp4/startup.py: TensorFlow's start-up notices dropped, every other line of stderr kept, each in a
process of its own (the filter works on file descriptor 2; TensorFlow loads once per process)."""

import os
import subprocess
import sys

from helpers import REPO

# Two notices as TensorFlow 2.21 writes them (the second one's middle shortened), and lines that
# must pass: one of ours, and a warning from the same source file as a notice.
NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796230308.523413    4518 port.cc:153] oneDNN custom operations are on. You may "
    b"see slightly different numerical results. To turn them off, set TF_ENABLE_ONEDNN_OPTS=0.\n"
)
KEPT = b"a real load error\nW0000 00:00:1.5    7 port.cc:160] a warning of the same file\n"


def _python(code):
    """Run `code` after `from tp4 import startup`, TensorFlow marked as loaded (so not loaded)."""
    code = f"import sys\nsys.modules['tensorflow'] = None\nfrom tp4 import startup\n{code}"
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)


def test_known_notices_are_dropped_and_other_lines_kept_in_order():
    code = f"""
import os
with startup.filtered_stderr():
    os.write(2, {NOTICES + KEPT!r})
    print("from python", file=sys.stderr)
print("after", file=sys.stderr)
"""
    done = _python(code)
    assert done.returncode == 0
    assert done.stderr == KEPT + b"from python\nafter\n"


def test_what_was_written_before_a_crash_inside_the_block_still_shows():
    code = """
import os
with startup.filtered_stderr():
    os.write(2, b"F0000 00:00:1.5 7 loader.cc:1] cannot load libfoo.so\\n")
    os.abort()
"""
    done = _python(code)
    assert done.returncode != 0
    assert done.stderr == b"F0000 00:00:1.5 7 loader.cc:1] cannot load libfoo.so\n"


def test_unet_py_quiet_shows_no_tensorflow_line():
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_")}  # as a user starts it
    done = subprocess.run(
        [sys.executable, "unet.py", "--quiet", "--input-size", "32", "--base-filters", "8"],
        cwd=REPO,
        capture_output=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert done.stdout.startswith(b"parameters: ")
