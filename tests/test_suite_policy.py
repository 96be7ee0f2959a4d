"""The suite's own rules (conftest.py): a skip under OPENOOD_DIFFGUARD_NO_SKIP=1 is a failure, tests marked
``openood`` skip only when OpenOOD is not installed, no test skips on an import of this package, and CI runs
the documented test commands (docs/benchmarks.md, "Tests"), which together select every fast test exactly once."""
import ast
import importlib.util
import itertools
import re
import shlex
from pathlib import Path

import pytest
import torch

pytest_plugins = ("pytester",)

HERE = Path(__file__).parent
ROOT = HERE.parent
NO_SKIP = "OPENOOD_DIFFGUARD_NO_SKIP"


@pytest.fixture(scope="module")
def openood_preimported():
    """pytester drops the modules an inner session imported, and OpenOOD's cv2 cannot be imported twice in
    one process: import OpenOOD (when installed) before any inner session so that it stays."""
    if importlib.util.find_spec("openood") is not None:
        import openood.evaluation_api  # noqa: F401


@pytest.fixture
def inner(openood_preimported, pytester, monkeypatch):
    """A throw-away test session that uses this suite's conftest.py."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # third-party plugins cost seconds per session
    threads = torch.get_num_threads()  # the conftest sets the thread count on import
    pytester.makeconftest((HERE / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    openood: needs OpenOOD\n")
    pytester.makepyfile(
        test_cases="""
            import pytest

            def test_passes():
                pass

            def test_skips():
                pytest.skip("no reason at all")

            @pytest.mark.xfail(reason="known", strict=True)
            def test_expected_failure():
                assert False

            @pytest.mark.openood
            def test_needs_openood():
                import openood.evaluation_api  # noqa: F401
        """,
        test_module_skip="""
            import pytest

            pytest.importorskip("no_such_module_for_the_skip_policy_test")

            def test_never_collected():
                pass
        """,
    )
    yield pytester
    torch.set_num_threads(threads)


def test_skips_are_reported_as_skips_by_default(inner, monkeypatch):
    monkeypatch.delenv(NO_SKIP, raising=False)
    res = inner.runpytest_inprocess("-rs")
    have_openood = importlib.util.find_spec("openood") is not None
    res.assert_outcomes(passed=1 + have_openood, skipped=3 - have_openood, xfailed=1)
    if not have_openood:
        res.stdout.fnmatch_lines(["*OpenOOD is not installed*"])


def test_no_skip_turns_every_skip_into_a_failure(inner, monkeypatch):
    monkeypatch.setenv(NO_SKIP, "1")
    res = inner.runpytest_inprocess("--continue-on-collection-errors")  # without it, the collection error stops the run
    have_openood = importlib.util.find_spec("openood") is not None
    # the test's skip fails; skips at collection (module) and in setup (the openood marker) are errors
    res.assert_outcomes(passed=1 + have_openood, failed=1, errors=2 - have_openood, xfailed=1)
    res.stdout.fnmatch_lines([f"*skipped while {NO_SKIP}=1 forbids skips: no reason at all*"])
    assert res.ret != 0


def test_an_installed_but_broken_openood_errors_instead_of_skipping(inner, monkeypatch):
    import sys

    monkeypatch.delenv(NO_SKIP, raising=False)
    for name in [m for m in sys.modules if m == "openood" or m.startswith("openood.")]:
        monkeypatch.delitem(sys.modules, name)  # restored afterwards
    inner.mkpydir("openood").joinpath("__init__.py").write_text("raise ImportError('half-installed OpenOOD')\n")
    inner.syspathinsert()
    res = inner.runpytest_inprocess("-k", "needs_openood")
    res.assert_outcomes(errors=1, skipped=1)  # skipped: the other module's importorskip
    res.stdout.fnmatch_lines(["*ImportError: half-installed OpenOOD*"])


def _importorskip_targets(source: str) -> list[str]:
    """Module names given to ``importorskip`` calls in ``source`` (the expression's text when not a literal)."""
    targets = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "importorskip":
            arg = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "modname"), None)
            targets.append(arg.value if isinstance(arg, ast.Constant) else ast.unparse(arg) if arg else "")
    return targets


def _forbidden(target: str) -> bool:
    """Anything but OpenOOD itself (its package or submodules): our modules and test dependencies must import."""
    return target != "openood" and not target.startswith("openood.")


def test_no_test_skips_on_an_import_of_this_package():
    """A broken import of our own code must fail, not skip: only OpenOOD itself may be import-skipped."""
    assert [t for t in _importorskip_targets("import pytest\nm = pytest.importorskip('openood_diffguard.fusion')\n"
                                             "from pytest import importorskip\nimportorskip(modname=name)")
            if _forbidden(t)] == ["openood_diffguard.fusion", "name"]  # the scan finds both spellings
    offenders = {p.name: t for p in sorted(HERE.glob("*.py"))
                 for t in _importorskip_targets(p.read_text()) if _forbidden(t)}
    assert offenders == {}


def _readme_test_commands() -> list[str]:
    text = (ROOT / "docs" / "benchmarks.md").read_text()  # the short README links the test commands from there
    section = text[text.index("\n## Tests\n"):]
    section = section[:section.find("\n## ", 1)] if "\n## " in section[1:] else section
    return [line for block in re.findall(r"```bash\n(.*?)```", section, re.S) for line in block.splitlines()
            if "pytest" in line]


def test_ci_runs_the_readme_commands_which_select_every_fast_test_once():
    from _pytest.mark.expression import Expression

    commands = _readme_test_commands()
    assert len(commands) == 2, commands
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    for cmd in commands:
        assert any(line.endswith(cmd) for line in ci_lines), f".ci/run does not run the documented {cmd!r}"
        assert cmd.startswith("OPENOOD_DIFFGUARD_NO_SKIP=1 "), cmd
    exprs = [Expression.compile(args[len(args) - args[::-1].index("-m")]) for args in map(shlex.split, commands)]
    for slow, openood in itertools.product([False, True], repeat=2):
        marks = {name for name, on in (("slow", slow), ("openood", openood)) if on}
        chosen = sum(e.evaluate(lambda name, **_: name in marks) for e in exprs)
        assert chosen == (0 if slow else 1), (marks, chosen)  # fast tests once, slow ones never (CI budget)
