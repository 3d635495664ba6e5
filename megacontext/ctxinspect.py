"""
Print what a MegaContext tree directory holds on disk, without loading a model.

Usage:
    python -m megacontext.ctxinspect DIR           # DIR/LOD0.ctx, LOD1.ctx, LOD2.ctx (or any *.ctx in DIR)
    python -m megacontext.ctxinspect FILE.ctx      # one file
    python -m megacontext.ctxinspect DIR --json    # the same facts as one JSON object

(The module is not called `inspect`: a file of that name shadows the standard library's
`inspect`, which torch imports, whenever megacontext/ itself lands on sys.path.)

For each file: the header fields, committed entry count and the tokens they cover,
the stored and recomputed payload CRC32, the base model name, the GistNet as both its
identity string (from the tree's tree.json, the name megacontext.ingest prints) and the
id the gist files store (a hash of that string, storage.gistnet_id), and any uncommitted
tail left by an interrupted append. Exit status: 0 when every file reads
and verifies, 1 when any file is damaged or the levels disagree, 2 when there is
nothing to inspect. This tool only reads; it never repairs or rewrites a file.
"""

import argparse
import json
import sys
from pathlib import Path

from megacontext.storage import (HEADER_SIZE, LEVEL_FILENAMES, MAGIC, CtxFormatError, check_tree,
                                 gistnet_id, open_ctx)

TREE_META = "tree.json"  # megacontext/tree.py's metadata file; it holds the GistNet identity string


def read_gistnet_name(directory):
    """The GistNet identity string a tree directory's tree.json records, or None."""
    try:
        meta = json.loads((Path(directory) / TREE_META).read_text())
    except (OSError, ValueError):
        return None
    name = meta.get("gistnet_name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) and name else None


def inspect_file(path, verify=True, gistnet_name=None):
    """Facts about one .ctx file as a dict; a file that cannot be read gets an 'error' entry.
    gistnet_name: the identity string the tree records, shown beside the stored id."""
    facts = {"path": str(path), "ok": False}
    try:
        reader = open_ctx(path, verify=False)  # verified below, so a mismatch can be shown, not just raised
    except (CtxFormatError, OSError) as e:
        facts["error"] = str(e)
        return facts
    with reader:
        info = reader.commit_info
        facts.update(
            header=reader.header,
            dtype=reader.dtype,
            entries=len(reader),
            entry_bytes=reader.entry_bytes,
            tokens_covered=len(reader) * reader.tokens_per_entry,
            file_bytes=HEADER_SIZE + len(reader) * reader.entry_bytes + reader.torn_tail_bytes,
            uncommitted_tail_bytes=reader.torn_tail_bytes,
            model_name=reader.model_name,
            gistnet_id=f"0x{reader.gistnet_id:08X}" if reader.level > 0 else None,
            gistnet_name=gistnet_name if reader.level > 0 else None,
            gistnet_name_matches=(gistnet_id(gistnet_name) == reader.gistnet_id
                                  if reader.level > 0 and gistnet_name and reader.gistnet_id else None),
            seed_spec=info["seed_spec"],
            flags=info["flags"],
            payload_crc32_stored=None if info["seed_spec"] else f"0x{info['payload_crc32']:08X}",
            payload_crc32_computed=f"0x{reader.compute_payload_crc32():08X}" if verify else None,
        )
        if facts["seed_spec"] or not verify:
            facts["checksum"] = "none (seed-spec file)" if facts["seed_spec"] else "not checked"
            facts["ok"] = True
        elif facts["payload_crc32_stored"] == facts["payload_crc32_computed"]:
            facts["checksum"], facts["ok"] = "OK", True
        else:
            facts["checksum"] = "MISMATCH (payload corrupted)"
            facts["error"] = (f"payload CRC32 {facts['payload_crc32_computed']} does not match the committed "
                              f"{facts['payload_crc32_stored']}")
    return facts


def inspect_paths(target, verify=True):
    """Facts for a directory (its level files, or else its *.ctx files) or a single file."""
    target = Path(target)
    if target.is_file():
        name = read_gistnet_name(target.parent)
        return {"target": str(target), "files": [inspect_file(target, verify, name)], "tree": None}
    if not target.is_dir():
        raise FileNotFoundError(f"{target} does not exist; pass a tree directory or a .ctx file")
    paths = [target / name for name in LEVEL_FILENAMES if (target / name).exists()]
    if not paths:
        paths = sorted(target.glob("*.ctx"))
    if not paths:
        raise FileNotFoundError(f"{target} holds no .ctx files (expected {', '.join(LEVEL_FILENAMES)})")
    name = read_gistnet_name(target)
    report = {"target": str(target), "files": [inspect_file(p, verify, name) for p in paths], "tree": None}
    if [p.name for p in paths] == list(LEVEL_FILENAMES) and all(f["ok"] for f in report["files"]):
        readers = [open_ctx(p, verify=False) for p in paths]
        try:
            check_tree(readers)
            report["tree"] = "consistent"
        except CtxFormatError as e:
            report["tree"] = f"INCONSISTENT: {e}"
        finally:
            for r in readers:
                r.close()
    return report


def describe_gistnet(facts):
    """'NAME' (id 0x...) for a gist file; says so when the name is unknown or does not hash to the id."""
    if facts["gistnet_id"] is None:
        return "none (token ids)"
    if facts["gistnet_name"] is None:
        return f"id {facts['gistnet_id']} (identity string unknown: no {TREE_META} beside the file)"
    text = f"{facts['gistnet_name']!r} (id {facts['gistnet_id']})"
    if facts["gistnet_name_matches"] is False:
        text += f": {TREE_META} names another GistNet than the one that wrote these gists"
    return text


def format_report(report):
    lines = [f"MegaContext storage: {report['target']}"]
    for f in report["files"]:
        lines.append("")
        lines.append(f"{Path(f['path']).name}")
        if "header" not in f:
            lines.append(f"  ERROR     {f['error']}")
            continue
        h = f["header"]
        lines.append(f"  header    magic=0x{MAGIC:08X} version={h['version']} level={h['level']} "
                     f"block_size={h['block_size']} embedding_dim={h['embedding_dim']} "
                     f"dtype_code={h['dtype_code']} ({f['dtype']})")
        lines.append(f"  model     {f['model_name']!r}")
        lines.append(f"  gistnet   {describe_gistnet(f)}")
        lines.append(f"  entries   {f['entries']} committed x {f['entry_bytes']} bytes, "
                     f"covering {f['tokens_covered']} tokens ({f['file_bytes']} bytes on disk)")
        format_kind = "seed spec (reserved bytes zero: no commit record)" if f["seed_spec"] else \
            f"committed (flags 0x{f['flags']:04X})"
        lines.append(f"  format    {format_kind}")
        stored = f["payload_crc32_stored"] or "-"
        computed = f["payload_crc32_computed"] or "-"
        lines.append(f"  checksum  crc32 stored {stored} computed {computed}: {f['checksum']}")
        tail = f["uncommitted_tail_bytes"]
        lines.append(f"  tail      " + (f"{tail} bytes of an interrupted append (ignored; cut on next append)"
                                         if tail else "clean"))
    if report["tree"] is not None:
        lines.append("")
        lines.append(f"tree: {report['tree']}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Inspect MegaContext .ctx files")
    parser.add_argument("target", metavar="DIR", help="tree directory (LOD0/1/2.ctx) or a single .ctx file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-verify", action="store_true", help="skip recomputing payload checksums")
    args = parser.parse_args(argv)
    try:
        report = inspect_paths(args.target, verify=not args.no_verify)
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    healthy = all(f["ok"] for f in report["files"]) and report["tree"] in (None, "consistent")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
