"""The `vlpcache` command (pyproject's [project.scripts], and `python -m vlpcache`).

`main()` also runs a command in another program's process (a notebook, a script: sys.argv set first); it
then ends as every click command does, by raising SystemExit, and leaves the process's Ctrl-C handling alone.
Only where the process is the vlpcache command itself may it end at once (os._exit), skipping the
interpreter's teardown (cli.exit_now)."""

import contextlib
import sys
from pathlib import Path

from vlpcache.interrupts import quiet_while_importing

# the file pip writes for [project.scripts] (bin/vlpcache), which runs `sys.exit(main())` as its __main__
CONSOLE_SCRIPT = "vlpcache"


def own_process() -> bool:
    """Whether this process is the vlpcache command: `python -m vlpcache` or the console script, not a notebook,
    `python -c` or another program's script that calls main()."""
    top = sys.modules.get("__main__")
    spec = getattr(top, "__spec__", None)
    if spec is not None:
        return spec.name == "vlpcache.__main__"
    return Path(getattr(top, "__file__", None) or "").name == CONSOLE_SCRIPT


def main() -> None:
    own = own_process()
    with quiet_while_importing() if own else contextlib.nullcontext():
        from vlpcache.cli import main as command_table
    command_table(own_process=own)


if __name__ == "__main__":
    main()
