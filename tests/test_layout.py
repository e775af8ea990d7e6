"""The layout's import rules, as the package docstrings state them: pet imports nothing else
of the toolkit, the core imports only pet, sampling never imports evaluation; scripts import
no other script and edit no sys.path."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "guided_diffusion"
ALLOWED = {
    "pet": {"pet"},
    "core": {"core", "pet"},
    "sampling": {"core", "pet", "sampling"},
    "evaluation": {"core", "pet", "sampling", "evaluation"},
}


def _part(module):
    """``"pet"``, ``"sampling"``, ``"evaluation"`` or ``"core"`` of a dotted toolkit module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ALLOWED else "core"


def _toolkit_imports(path):
    """Dotted names of the toolkit modules ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            qualify = node.level or not node.module or node.module == "guided_diffusion"
            names += [f"{base}.{alias.name}" if qualify else base for alias in node.names]
    return [n for n in names if n.startswith("guided_diffusion.")]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_each_package_imports_only_what_its_docstring_allows(path):
    own = _part(".".join(path.relative_to(REPO).with_suffix("").parts))
    for name in _toolkit_imports(path):
        if name.count(".") == 1 and name.split(".")[1] in ALLOWED:
            target = name.split(".")[1]  # `from guided_diffusion import pet`
        else:
            target = _part(name)
        assert target in ALLOWED[own], f"{path.name} ({own}) imports {name} ({target})"


def test_scripts_import_no_other_script_and_edit_no_sys_path():
    scripts = {p.stem for p in (REPO / "scripts").glob("*.py")}
    for path in (REPO / "scripts").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name for a in node.names} & scripts, path.name
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert (node.module or "") not in scripts, path.name
        assert "sys.path" not in path.read_text(), path.name
