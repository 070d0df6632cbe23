"""The pack's entry point outside ComfyUI: importable, registering nothing, importing no model code."""

import importlib.util
import subprocess
import sys

from tests.nodes.comfy_server import REPO_ROOT


def test_pack_imports_without_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('pack', {str(REPO_ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(REPO_ROOT)!r}])\n"
        "pack = importlib.util.module_from_spec(spec); spec.loader.exec_module(pack)\n"
        "assert pack.comfy_entrypoint is None\n"
        "import mmr1\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"  # no model code at import
    assert importlib.util.find_spec("comfy_api") is None  # the premise: no ComfyUI on this interpreter's path


def test_the_pack_imports_its_own_modules_relatively():
    """ComfyUI users clone the pack without pip-installing it, so `mmr1` is not importable by name there: inside
    mmr1/ and nodes/ every import of the pack's own modules must be relative."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    absolute = []
    for path in sorted([*root.glob("mmr1/**/*.py"), *root.glob("nodes/**/*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            absolute += [f"{path.relative_to(root)}:{node.lineno}" for name in names
                         if name.split(".")[0] in ("mmr1", "nodes", "training")]
    assert absolute == []
