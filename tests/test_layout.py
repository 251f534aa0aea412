"""The layout's rules that code can check: no two of the project's modules import each other, directly or round a
longer circle (imports inside functions count: a lazy import is still a dependency), and judge.py touches no files."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_modules() -> dict[str, Path]:
    """Top-level modules (ssr, judge, ...) and the kernels package, one node for all its files."""
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    assert {"ssr", "judge", "data", "model", "checkpoint", "eval", "testsets"} <= set(modules)
    return modules


def imported(path: Path, names: set[str]) -> set[str]:
    """The project modules a file imports anywhere in its body (top level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.partition(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.partition(".")[0])
    return found & names


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    names = set(modules) | {"kernels"}
    graph = {name: imported(path, names) - {name} for name, path in modules.items()}
    graph["kernels"] = set().union(*(imported(p, names) for p in (ROOT / "kernels").glob("*.py"))) - {"kernels"}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports (depth-first search), or None."""
    state: dict[str, str] = {}  # "open" while on the stack, "done" after

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, stack + [dep])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles():
    graph = import_graph()
    assert graph["model"] <= {"kernels"}  # the network knows nothing of files
    assert "checkpoint" in graph["distributed"] and "data" in graph["testsets"]  # the parser sees real imports
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_judge_reads_no_files():
    """judge.py is prompts, parsing and rewards on strings: no open/Path/yaml/json file access (COMET checkpoints
    are loaded by checkpoint.load_comet and handed to CometScorer)."""
    tree = ast.parse((ROOT / "judge.py").read_text(encoding="utf-8"))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    modules = imported(ROOT / "judge.py", {"pathlib", "os", "yaml", "json", "shutil", "glob", "io"})
    assert not names & {"open", "Path"} and not modules, (names & {"open", "Path"}, modules)
    assert not attrs & {"read_text", "read_bytes", "load_from_checkpoint", "download_model"}
