"""
Map our mirrored files onto an upstream nanochat checkout, name by name (nothing is run).

    python -m scripts.upstream_map --upstream /path/to/nanochat [--ours DIR] [--file nanochat/gpt.py]

For every file that exists in both trees under nanochat/, scripts/ and tasks/ it prints
which of upstream's functions, classes and methods we have, lack or add (and whether the
shared ones come in upstream's order), which argparse flags we lack or add, and the names
that differ inside shared functions: signatures, and local variables upstream has that
ours does not. Each difference is looked up in the reasons table of UPSTREAM.md
("## Differences and their reasons": | file | name | reason |, name `*` = the whole file);
one without a reason is marked "NO REASON". The last line is either
"nothing differs without a reason written in UPSTREAM.md" (exit 0) or the count of
differences that lack one (exit 1).

Owns: the static comparison and the reasons lookup. Must never import or run either tree.
"""
import argparse
import ast
import os
import re
import sys
from pathlib import Path

OUR_ROOT = Path(__file__).resolve().parent.parent
MIRRORED_DIRS = ("nanochat", "scripts", "tasks")
# Where one of our files keeps another's code: base_train's loop (module-level functions and
# flags upstream) lives in nanochat/train.py, where its helpers are nested in train().
COUNTERPARTS = {"scripts/base_train.py": "nanochat/train.py"}
REASONS_HEADING = "## Differences and their reasons"


class MapError(Exception):
    """Bad input: reported as one line."""

# -----------------------------------------------------------------------------
# What a file defines


def definitions(tree, nested=False):
    """[(qualified name, node)] of top-level functions/classes and class methods, in file order;
    nested=True adds functions defined inside functions, under their bare name."""
    if nested:
        found = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
        return [(n.name, n) for n in sorted(found, key=lambda n: n.lineno)]
    out = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.name, node))
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        out.append((f"{node.name}.{sub.name}", sub))
    return out


def signature(node):
    """A function's parameter list as source text, e.g. (self, idx, targets=None)."""
    return "(" + ast.unparse(node.args) + ")"


def local_names(node):
    """Names a function binds itself (assignments, loop/with/except targets, nested defs),
    excluding those of functions nested inside it."""
    names = set()
    stack = list(node.body)
    while stack:
        n = stack.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(n.name)
            continue
        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            names.add(n.id)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            names.add(n.name)
        stack.extend(ast.iter_child_nodes(n))
    return names


def argparse_flags(tree):
    flags = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            for arg in node.args:
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("-"):
                    if arg.value not in flags:
                        flags.append(arg.value)
    return flags


def parse(path):
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise MapError(f"{path}:{e.lineno} does not parse ({e.msg}); fix the file or check out a clean tree")

# -----------------------------------------------------------------------------
# Reasons written in UPSTREAM.md


def read_reasons(upstream_md):
    """{(file, name): reason} from the reasons table; name '*' covers the whole file."""
    reasons = {}
    if not upstream_md.exists():
        return reasons
    in_section = False
    for line in upstream_md.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            in_section = line.strip() == REASONS_HEADING
            continue
        if not in_section or not line.startswith("|"):
            continue
        cells = [c.strip().strip("`").strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] in ("file", "") or set(cells[0]) <= set("-: "):
            continue
        for name in cells[1].split(","):
            reasons[(cells[0], name.strip().strip("`"))] = cells[2]
    return reasons


def reason_for(reasons, rel, name):
    """The row for this name, else for its class's methods (Class.*), else for the whole file."""
    methods = reasons.get((rel, name.split(".")[0] + ".*")) if "." in name else None
    return reasons.get((rel, name)) or methods or reasons.get((rel, "*"))

# -----------------------------------------------------------------------------
# The map


def compare_file(up_path, our_path, counterpart=None):
    """The differences of one mirrored file: a list of (kind, name, detail)."""
    up_tree, our_tree = parse(up_path), parse(our_path)
    up_defs = definitions(up_tree)
    if counterpart is not None:
        our_tree = parse(counterpart)
        our_defs = definitions(our_tree, nested=True)
    else:
        our_defs = definitions(our_tree)
    up_names = [n for n, _ in up_defs]
    our_names = [n for n, _ in our_defs]
    ours = dict(our_defs)
    diffs = []
    have = [n for n in up_names if n in ours]
    for n in up_names:
        if n not in ours:
            diffs.append(("lack", n, "upstream defines it, ours does not"))
    for n in our_names:
        if n not in dict(up_defs):
            diffs.append(("add", n, "ours only"))
    our_order = [n for n in our_names if n in set(have)]
    if our_order != have:
        first = next(i for i, (a, b) in enumerate(zip(have, our_order)) if a != b)
        diffs.append(("order", have[first], f"upstream has {have[first]} where ours has {our_order[first]}"))
    for name, up_node in up_defs:
        our_node = ours.get(name)
        if our_node is None or isinstance(up_node, ast.ClassDef) or isinstance(our_node, ast.ClassDef):
            continue
        if signature(up_node) != signature(our_node):
            diffs.append(("signature", name, f"upstream {signature(up_node)}, ours {signature(our_node)}"))
        missing = sorted(local_names(up_node) - local_names(our_node))
        if missing:
            diffs.append(("locals", name, "upstream's " + ", ".join(missing) + " not in ours"))
    up_flags, our_flags = argparse_flags(up_tree), argparse_flags(our_tree)
    for f in up_flags:
        if f not in our_flags:
            diffs.append(("lack", f, "upstream flag, not in ours"))
    for f in our_flags:
        if f not in up_flags:
            diffs.append(("add", f, "our flag"))
    shared_flags = [f for f in up_flags if f in our_flags]
    if [f for f in our_flags if f in set(shared_flags)] != shared_flags and shared_flags:
        diffs.append(("order", "flags", "shared flags are not in upstream's order"))
    return len(up_names), len(have), diffs


def mirrored_files(upstream, ours):
    files = []
    for top in MIRRORED_DIRS:
        for path in sorted((upstream / top).glob("*.py")):
            rel = path.relative_to(upstream).as_posix()
            if (ours / rel).is_file():
                files.append(rel)
    return files


def run_map(upstream, ours, only=None, out=sys.stdout):
    reasons = read_reasons(ours / "UPSTREAM.md")
    unexplained = 0
    files = mirrored_files(upstream, ours)
    if only:
        if only not in files:
            raise MapError(f"--file {only} is not a file both trees have; mirrored files: {', '.join(files)}")
        files = [only]
    for rel in files:
        counterpart = ours / COUNTERPARTS[rel] if rel in COUNTERPARTS and (ours / COUNTERPARTS[rel]).is_file() else None
        n_up, n_have, diffs = compare_file(upstream / rel, ours / rel, counterpart)
        where = f" (ours in {COUNTERPARTS[rel]})" if counterpart is not None else ""
        print(f"{rel}: have {n_have}/{n_up} upstream names{where}, {len(diffs)} difference(s)", file=out)
        for kind, name, detail in diffs:
            reason = reason_for(reasons, rel, name)
            if reason is None:
                unexplained += 1
            print(f"  {kind} {name}: {detail} -- {reason if reason else 'NO REASON'}", file=out)
    if unexplained:
        print(f"upstream_map: {unexplained} difference(s) without a reason in UPSTREAM.md", file=out)
    else:
        print("upstream_map: nothing differs without a reason written in UPSTREAM.md", file=out)
    return 1 if unexplained else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Map our mirrored files onto an upstream nanochat checkout")
    parser.add_argument("--upstream", type=str, required=True, help="checkout of karpathy/nanochat")
    parser.add_argument("--ours", type=str, default=str(OUR_ROOT), help="our tree (default: this repo)")
    parser.add_argument("--file", type=str, default=None, help="only this mirrored file, e.g. nanochat/gpt.py")
    args = parser.parse_args(argv)
    upstream, ours = Path(args.upstream).resolve(), Path(args.ours).resolve()
    if not (upstream / "nanochat").is_dir():
        raise MapError(f"--upstream {upstream} is not an upstream nanochat checkout (no nanochat/ folder); "
                       f"pass the directory that holds nanochat/ and scripts/")
    return run_map(upstream, ours, args.file)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MapError as e:
        if os.environ.get("NANOCHAT_DEBUG") == "1":
            raise
        print(f"upstream_map: {e}", file=sys.stderr)
        sys.exit(2)
