"""Commands started as a shell starts them: some signals back to their default or ignored, some limits
(`ulimit`), set by a small Python that then execs the command (same process, same pid).

Not by subprocess's preexec_fn, nor by os.fork: either runs Python in a forked child of the test process,
which has threads of its own (pytest-xdist's, tqdm's monitor, the page's thumbnail pool, Ray's); what one of
them held at the fork is held for ever in the child, and the child frees their objects (an av frame
reformatter waited there for threads the child does not have: CI's suite hung until its time ran out).
Python's documentation warns of it. subprocess without a preexec_fn runs no Python between fork and exec.
"""

from __future__ import annotations

import json
import signal
import sys
from typing import Iterable, Sequence

PRELUDE = """import json, os, resource, signal, sys
spec = json.loads(sys.argv[1])
for name in spec["default"]:
    signal.signal(getattr(signal, name), signal.SIG_DFL)
for name in spec["ignore"]:
    signal.signal(getattr(signal, name), signal.SIG_IGN)
for name, (soft, hard) in spec["limits"].items():
    resource.setrlimit(getattr(resource, name), (soft, hard))
os.execv(sys.argv[2], sys.argv[2:])
"""


def as_a_shell_starts_it(command: Sequence[str], *, default: Iterable[signal.Signals] = (),
                         ignore: Iterable[signal.Signals] = (),
                         limits: dict[str, tuple[int, int]] | None = None) -> list[str]:
    """The argv that runs `command` (its first word a path, as sys.executable) with the signals in `default`
    at their default action (Ctrl-C taken even where the suite runs under nohup or `&`), those in `ignore`
    ignored (both kept across exec) and `limits` set: resource names, e.g. {"RLIMIT_NOFILE": (200, 200)}.
    With nothing to set, `command` itself."""
    spec = {"default": [signal.Signals(s).name for s in default], "ignore": [signal.Signals(s).name for s in ignore],
            "limits": dict(limits or {})}
    if not any(spec.values()):
        return list(map(str, command))
    return [sys.executable, "-c", PRELUDE, json.dumps(spec), *map(str, command)]
