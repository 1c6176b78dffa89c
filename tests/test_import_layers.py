"""Imports run one way: command lines -> stages -> shared ground.

The import graph of every module of the four packages is read with ``ast`` (every ``import`` and
``from ... import`` of a package module, those inside functions included) and checked for two
faults: a circle between modules, and an arrow from a lower layer to a higher one.

The layers, lowest first (``LAYERS``):

0. shared ground - what every stage reads: the error base (``ssl_pretrain.errors``), the config
   schema (``ssl_pretrain.settings``), checkpoints, data sources and decoding, augmentations,
   backbones and the engine (devices and cores, hardware, distributed helpers, optimiser, run
   folder);
1. pretraining - the methods, the full config and its presets, the loop and what it needs;
2. curation - label selection and duplicate search (``ssl_curate``), which evaluation measures;
3. evaluation - ``linear_probe``, which reads checkpoints and images, never training internals;
4. the classifier - ``ssl_classifier``, built on evaluation's probes;
5. command lines - each ``cli``, ``*_cli``, ``__main__`` and ``linear_probe.embed`` (``ssl-embed``):
   the composition roots. They may import any stage: ``ssl-pretrain`` hands evaluation's kNN
   monitor to the loop, ``ssl-select`` and ``ssl-dedup`` embed images with evaluation's extractor.

A module may import its own layer (within its package) and any layer below; arrows between
modules of one layer must not close a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ssl_pretrain", "linear_probe", "ssl_curate", "ssl_classifier")

COMMAND_LINES = {"ssl_pretrain.cli", "ssl_pretrain.__main__", "linear_probe.cli", "linear_probe.__main__",
                 "linear_probe.embed", "ssl_classifier.cli", "ssl_curate.select_cli", "ssl_curate.dedup_cli"}
PRETRAINING = ("ssl_pretrain.methods", "ssl_pretrain.config", "ssl_pretrain.presets", "ssl_pretrain.precision",
               "ssl_pretrain.resume", "ssl_pretrain.diagnostics", "ssl_pretrain.train")
LAYERS = ("shared ground", "pretraining", "curation", "evaluation", "classifier", "command lines")


def layer(module: str) -> int:
    """The position of ``module`` in ``LAYERS``."""
    if module in COMMAND_LINES:
        return 5
    if module.startswith("ssl_classifier"):
        return 4
    if module.startswith("linear_probe"):
        return 3
    if module.startswith("ssl_curate"):
        return 2
    if any(module == stage or module.startswith(stage + ".") for stage in PRETRAINING):
        return 1
    return 0


def package_modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the four packages (a package is its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (functions included)."""
    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            # ``from pkg import submodule`` imports the submodule
            found.update(resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names)
    return {module for module in found if module and module != name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as ``[a, b, ..., a]``, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (circle := visit(node)):
            return circle
    return None


def test_the_graph_sees_imports_inside_functions():
    # the check is only as good as its reading of the files: a lazy import is an arrow too
    graph = import_graph()
    assert "linear_probe.plots" in graph["linear_probe.evaluate"]  # imported inside make_plots
    assert "ssl_pretrain.models.backbones" in graph["ssl_pretrain.checkpoint"]


def test_no_import_circle_between_modules():
    circle = find_circle(import_graph())
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_imports_run_from_command_lines_to_stages_to_shared_ground():
    upward = [f"{source} ({LAYERS[layer(source)]}) imports {target} ({LAYERS[layer(target)]})"
              for source, targets in import_graph().items() for target in sorted(targets)
              if layer(target) > layer(source)]
    assert not upward, "imports against the layers:\n" + "\n".join(upward)


def test_stages_of_one_layer_do_not_import_each_other_across_packages():
    # e.g. a future module of ssl_curate at the evaluation layer would be a second way round
    crossing = [f"{source} imports {target}" for source, targets in import_graph().items()
                for target in targets if layer(target) == layer(source) and layer(source) < 5
                and source.split(".")[0] != target.split(".")[0]]
    assert not crossing, "\n".join(crossing)


def test_pretraining_never_imports_evaluation_curation_or_the_classifier():
    # STYLE.md: ssl_pretrain owns everything up to the checkpoint; only its command line (the
    # composition root) may hand the loop evaluation's monitor
    reaching = [f"{source} imports {target}" for source, targets in import_graph().items()
                if source.startswith("ssl_pretrain") and source not in COMMAND_LINES
                for target in targets if not target.startswith("ssl_pretrain")]
    assert not reaching, "\n".join(reaching)


def test_evaluation_and_curation_stages_import_one_way_only():
    graph = import_graph()
    back = [f"{source} imports {target}" for source, targets in graph.items()
            if source.startswith("ssl_curate") and source not in COMMAND_LINES
            for target in targets if target.startswith("linear_probe")]
    assert not back, "ssl_curate's stage modules must not import linear_probe:\n" + "\n".join(back)
