"""bench/mutants.py stays in step with the code it plants bugs in, without running it (it takes half an
hour): a mutant whose text no longer occurs once in its file checks nothing until someone updates it."""

import importlib.util
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_mutants():
    spec = importlib.util.spec_from_file_location("bench_mutants", REPO / "bench" / "mutants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_mutant_plants_its_bug_in_text_that_occurs_once_and_names_tests_that_exist():
    mutants = load_mutants()
    stale = [m.name for m in mutants if (REPO / m.file).read_text(encoding="utf-8").count(m.old) != 1]
    assert stale == [], "update these mutants: their text no longer occurs exactly once in their file"
    assert all(m.old != m.new for m in mutants)
    names = [m.name for m in mutants]
    assert len(set(names)) == len(names), "two mutants share a name"
    missing = [(m.name, t) for m in mutants for t in m.tests
               if t.startswith("tests/") and not (REPO / t.split("::")[0]).is_file()]
    assert missing == []


def test_the_readme_counts_the_mutants_there_are():
    said = re.search(r"\((\d+) of them, about \d+ minutes", (REPO / "README.md").read_text(encoding="utf-8"))
    assert said and int(said.group(1)) == len(load_mutants())
