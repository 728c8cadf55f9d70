"""The command and the Python API run in another program's process (a notebook's kernel, a user's script):
they end as a library call does, by raising, and leave that process to go on."""

import os
import shutil
import subprocess
import sys

from waiting import HANG_GUARD_S

# only in the process the test starts: its spawned children (decoding workers, multiprocessing's resource tracker)
# read this sitecustomize too, and theirs said "teardown ran" out of order, or failed on a closed stdout
SITE_TEARDOWN = ('import atexit, os\nif os.environ.pop("VLPCACHE_TEST_TEARDOWN_PROBE", None):\n'
                 '    atexit.register(lambda: print("teardown ran", flush=True))\n')

CALLER = """
import sys
from vlpcache.__main__ import main
sys.argv = ["vlpcache", "extract", {root!r}, "-o", {cache!r}, "--frames", "2", "--workers", "0", "--quiet"]
try:
    main()
except SystemExit as end:
    print("SystemExit", end.code)
finally:
    print("finally ran")
print("went on")
"""


def _python(*args, tmp_path) -> subprocess.CompletedProcess:
    """Python with a sitecustomize that says when the interpreter's teardown runs its atexit functions."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE_TEARDOWN)
    env = {**os.environ, "VLPCACHE_TEST_TEARDOWN_PROBE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)


def test_extract_called_in_a_program_raises_system_exit_and_the_program_goes_on(tmp_path, videos_dir):
    # main() of extract ended the whole process (os._exit) after its summary: nothing after the call, no finally,
    # no atexit ran, and a notebook's kernel died
    root, cache = tmp_path / "clips", tmp_path / "cache"
    root.mkdir()
    shutil.copy(videos_dir / "tests_data_test.mp4", root / "clip.mp4")
    script = tmp_path / "notebook_cell.py"
    script.write_text(CALLER.format(root=str(root), cache=str(cache)))
    done = _python(script, tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["SystemExit 0", "finally ran", "went on", "teardown ran"], done.stderr
    assert "1 done" in done.stderr

    # the vlpcache command itself (the console script pip writes, python -m vlpcache) still skips the teardown
    console = tmp_path / "bin" / "vlpcache"
    console.parent.mkdir()
    console.write_text("import sys\nfrom vlpcache.__main__ import main\nif __name__ == '__main__':\n"
                       "    sys.exit(main())\n")
    for command in ([console], ["-m", "vlpcache"]):
        done = _python(*command, "extract", root, "-o", cache, "--quiet", "--frames", "2", tmp_path=tmp_path)
        assert (done.returncode, done.stdout) == (0, ""), done.stderr
        assert "1 already cached" in done.stderr


def test_extract_from_a_script_s_top_level_without_a_main_guard_says_so_and_with_one_extracts(tmp_path, videos_dir):
    # spawned decoding workers import the script and run its top-level code again: each died, and after ~30 s the
    # command said "decoding workers die before they are ready", naming no cause and a fix (--workers 0) only
    root, cache = tmp_path / "clips", tmp_path / "cache"
    root.mkdir()
    shutil.copy(videos_dir / "tests_data_test.mp4", root / "clip.mp4")
    call = CALLER.format(root=str(root), cache=str(cache)).replace(', "--workers", "0"', "")
    script = tmp_path / "script.py"
    script.write_text('print("top-level ran")' + call)
    done = _python(script, tmp_path=tmp_path)
    line = 1 + call.splitlines().index("    main()")
    assert done.stdout.splitlines() == ["top-level ran", "SystemExit 2", "finally ran", "went on", "teardown ran"]
    assert done.stderr == (f"error: {script}:{line}: starts vlpcache's decoding worker processes from the script's "
                           "top-level code, which each of them runs again as it starts (they are spawned): put that "
                           "code under `if __name__ == \"__main__\":`, or decode in this process (--workers 0)\n")

    guarded = "\n".join(["import sys", "if __name__ == '__main__':", *("    " + row for row in call.splitlines())])
    script.write_text(guarded + "\n")
    done = _python(script, tmp_path=tmp_path)
    assert done.stdout.splitlines() == ["SystemExit 0", "finally ran", "went on", "teardown ran"], done.stderr
    assert "1 done" in done.stderr
