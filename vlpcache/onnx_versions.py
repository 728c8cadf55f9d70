"""An ONNX file the installed onnxruntime refuses for its version stamp alone: an IR version or an opset newer
than it knows (what current exporters write, read by an older onnxruntime that pyproject admits). Such a
file is not damaged, and its fix is a newer onnxruntime, never another copy of the file. No onnxruntime
import here: the error onnxruntime raised is read.

    onnxruntime 1.17 on an IR 10 file: "Unsupported model IR version: 10, max supported IR version: 9"
    on an opset 21 file: "Opset 21 is under development ... Current official support for domain ai.onnx is till opset 20."
"""

from __future__ import annotations

import re
import sys
from contextlib import contextmanager

from vlpcache.errors import GraphTooNew

NEWER_RUNTIME = "`pip install -U onnxruntime`"
IR_VERSION_ERROR = re.compile(r"Unsupported model IR version: (\d+), max supported IR version: (\d+)")
OPSET_ERROR = re.compile(r"Opset (\d+) is under development.*?support for domain (\S+) is till opset (\d+)", re.S)


def unreadable_version(err: BaseException) -> str | None:
    """The version stamp, in a phrase, that made the installed onnxruntime refuse a graph (`err`: what loading
    it raised), or None when `err` says something else (damaged bytes, a graph of another shape)."""
    runtime = getattr(sys.modules.get("onnxruntime"), "__version__", "")
    text = str(err)
    if found := IR_VERSION_ERROR.search(text):
        return f"ONNX IR version {found[1]}, newer than onnxruntime {runtime} reads (IR version {found[2]} at most)"
    if found := OPSET_ERROR.search(text):
        return (f"opset {found[1]} of {found[2]}, newer than onnxruntime {runtime} reads "
                f"(opset {found[3]} at most)")
    return None


def graph_too_new(what: str, err: BaseException, otherwise: str) -> GraphTooNew | None:
    """The one line for `what` (a file) whose load raised `err`, when its version stamp alone is the cause:
    a newer onnxruntime, `otherwise` the other way out (or ""); None for any other error."""
    phrase = unreadable_version(err)
    if phrase is None:
        return None
    why = f"{phrase}; {NEWER_RUNTIME}" + (f", or {otherwise}" if otherwise else "")
    return GraphTooNew(f"{what}: {why}", why)


@contextmanager
def too_new_said(what: str, otherwise: str = ""):
    """Within: loading an ONNX graph (`what`, a file) that fails for its version stamp alone raises that one line
    (graph_too_new); any other error is raised as it was."""
    try:
        yield
    except Exception as err:
        if (too_new := graph_too_new(what, err, otherwise)) is not None:
            raise too_new from None
        raise
