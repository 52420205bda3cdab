"""No module imports from a higher layer (issue 14): shared pieces < data < model < training < evaluation < analysis <
commands. Read from the source with ``ast``, lazy imports inside functions included."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "glm_session"
SHARED = {"errors", "run_info", "checkpoints", "supervision", "constants", "tokenizer", "config"}
RANK = {"shared": 0, "data": 1, "model": 2, "training": 3, "evaluation": 4, "analysis": 5, "commands": 6}
COMMANDS = {"train", "evaluate", "chat", "report", "convert", "export", "data.__main__", "analysis.__main__"}


def layer(module: str) -> str:
    if module in COMMANDS:
        return "commands"
    top = module.split(".")[0]
    return "shared" if top in SHARED else top if top in RANK else "shared"


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("glm_session."):
            found.add(node.module.removeprefix("glm_session."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("glm_session.") for a in node.names if a.name.startswith("glm_session.")}
    return found


def test_no_module_imports_from_a_higher_layer():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
        if module.startswith("resources") or module in ("", "__init__"):
            continue
        for imported in imports(path):
            if RANK[layer(imported)] > RANK[layer(module)]:
                offences.append(f"{module} ({layer(module)}) imports {imported} ({layer(imported)})")
    assert offences == []


def test_the_named_seams():
    assert not any(i.startswith("training") for p in (PACKAGE / "model").glob("*.py") for i in imports(p))
    assert not any(i.startswith("data") for i in imports(PACKAGE / "config.py"))
