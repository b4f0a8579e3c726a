"""No function in proxy/ is longer than a screen, and every test says what it shows (issue #27)."""

from __future__ import annotations

import ast
from pathlib import Path

import proxy

LIMIT = 60
"""Most lines a function may span, its decorators left out (end_lineno - lineno + 1)."""


def long_functions(root: Path) -> list[str]:
    """Every function under `root` longer than LIMIT, as "path:line name (n lines)"."""
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                lines = node.end_lineno - node.lineno + 1
                if lines > LIMIT:
                    where = path.relative_to(root.parent)
                    out.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    return out


def test_no_function_is_over_sixty_lines() -> None:
    """Every function and method in proxy/, testing/ included, spans at most 60 lines."""
    offenders = long_functions(Path(proxy.__file__).parent)
    assert not offenders, "functions over 60 lines:\n" + "\n".join(offenders)


def undocumented_tests(root: Path) -> list[str]:
    """Every test function under `root` with no docstring, as "path:line name"."""
    out = []
    for path in sorted(root.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                and node.name.startswith("test_")
                and not ast.get_docstring(node)
            ):
                out.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name}")
    return out


def test_every_test_has_a_docstring() -> None:
    """Every test function in tests/ carries a docstring saying what it shows (STYLE.md)."""
    offenders = undocumented_tests(Path(__file__).resolve().parents[1])
    assert not offenders, "tests without a docstring:\n" + "\n".join(offenders)


def test_the_docstring_check_sees_a_bare_test(tmp_path: Path) -> None:
    """A test function without a docstring is reported; one with a docstring, or a helper
    without one, is not."""
    suite = tmp_path / "tests"
    suite.mkdir()
    (suite / "test_m.py").write_text(
        'def test_said():\n    """It works."""\n\n\ndef helper():\n    pass\n\n\n'
        "async def test_bare():\n    pass\n"
    )
    assert undocumented_tests(suite) == ["tests/test_m.py:9 test_bare"]


def test_the_check_sees_a_long_function(tmp_path: Path) -> None:
    """A function of 61 lines is reported, one of 60 is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    (package / "m.py").write_text(f"def short():\n{body}\n\nasync def long():\n{body}    pass\n")
    assert long_functions(package) == ["pkg/m.py:63 long (61 lines)"]
