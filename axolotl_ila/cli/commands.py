"""``axolotl-ila``: search, show, compare and combine rankings.

The same commands are ``axolotl ila ...`` (``axolotl_ila.cli.axolotl_group``),
from the one table ``COMMANDS`` below: their arguments, help and behaviour.
A ranking argument is a local path or ``hf://OWNER/REPO[@REVISION]/PATH.json``.
Errors in what the user gave (a file, a flag) print one line,
``axolotl-ila: error: ...``, and exit with status 2; nothing is half-written.
axolotl itself is imported only by ``search`` and ``quickstart``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from axolotl_ila.architecture import block_index, module_kind
from axolotl_ila.ranking.analysis import COMBINE_METHODS, combine, compare, top_set
from axolotl_ila.ranking.file import Ranking, RankingError, RankingFile, file_digest, load_ranking, locate_ranking, save_ranking
from axolotl_ila.ranking.hub import is_hub_path
from axolotl_ila.report.text import relearn_line, top_bottom_table
from axolotl_ila.search.certainty import certainty, certainty_figures, certainty_warnings
from axolotl_ila.selection import FUSED_GROUPS, Selection, SelectionError, importance_order, no_groups_note, select


class UsageError(Exception):
    """Bad input from the command line; printed as one line, exit status 2."""


def _selection(ranking: Ranking, drop: float | None, keep: float | None, groups: tuple[str, ...] = ()) -> Selection:
    for key, value in (("--drop-fraction", drop), ("--keep-fraction", keep)):
        if value is not None and not 0.0 < value < 1.0:
            raise UsageError(f"{key} must be between 0 and 1 (exclusive), got {value}")
    order = importance_order(ranking.names, "ila", ranking=ranking)
    return select(ranking.names, order, "ila", drop_fraction=drop, keep_fraction=keep, groups=groups)


def _per_group(selection: Selection, key: Callable[[str], Any]) -> list[tuple[Any, int, int]]:
    kept = Counter(map(key, selection.kept))
    every = Counter(map(key, selection.kept + selection.dropped))
    return [(group, kept[group], every[group]) for group in sorted(every, key=lambda g: (g is None, g if g is not None else 0))]


def show_json(ranking: Ranking, selection: Selection, path: str | Path) -> dict[str, Any]:
    return {
        "ranking": str(path),
        "model": ranking.model,
        "scorer": ranking.scorer,
        "modules": [dict(m.to_json(), rank=i + 1, kept=m.name in set(selection.kept)) for i, m in enumerate(ranking.modules)],
        "selection": selection.to_json(),
        "per_type": {k: {"kept": kept, "all": n} for k, kept, n in _per_group(selection, module_kind)},
        "per_block": {str(b): {"kept": kept, "all": n} for b, kept, n in _per_group(selection, block_index)},
        "search": {k: ranking.search.get(k) for k in ("method", "created", "seed", "stage1", "stage2", "relearn", "data", "combine") if k in ranking.search},
        "certainty": certainty(ranking.search) if "stage1" in ranking.search else None,
    }


def _model_line(ranking: Ranking) -> str:
    model = ranking.model
    experts = model.get("num_expert_parameters")
    units = f"{model.get('num_linear_modules')} linear modules" + (f" + {experts} expert parameters" if experts else "")
    return f"model     {model.get('base_model')} ({model.get('model_type')}, {units}, {ranking.fingerprint[:19]}...)"


def _ranked_line(ranking: Ranking) -> str:
    """How many units are ranked, and why that can be fewer than the model has:
    only those the search's LoRA targets adapted are ranked."""
    model = ranking.model
    total = (model.get("num_linear_modules") or 0) + (model.get("num_expert_parameters") or 0)
    ranked = len(ranking.modules)
    if not total or ranked >= total:
        return f"scorer    {ranking.scorer}, {ranked} modules ranked"
    head_ranked = any(block_index(n) is None for n in ranking.names)
    hint = "" if head_ranked else "; lora_target_linear leaves out the output head, lm_head"
    return f"scorer    {ranking.scorer}, {ranked} of the model's {total} modules ranked: those the search's LoRA targeted{hint}"


def show_text(ranking: Ranking, selection: Selection, path: str | Path, top: int, requested_groups: tuple[str, ...] = ()) -> str:
    lines = [f"ranking   {path}", _model_line(ranking), _ranked_line(ranking)]
    search = ranking.search
    data = (search.get("data") or {}).get("datasets")
    if data:
        lines.append("data      " + ", ".join(str(d.get("path")) for d in data))
    loss = search.get("loss")
    if loss:
        coefficients = ", ".join(f"{k} {v}" for k, v in loss.items() if k != "method" and v is not None)
        lines.append(f"loss      {loss.get('method')}" + (f" ({coefficients})" if coefficients else ""))
    for stage in ("stage1", "stage2"):
        info = search.get(stage)
        if info:
            extra = f", stopped: {info['stop_reason']}" if "stop_reason" in info else ""
            lines.append(f"{stage}    {info.get('steps')} steps, {info.get('wall_s', 0):.1f} s, loss {info.get('loss_first', 0):.4f} -> {info.get('loss_last', 0):.4f}{extra}")
    relearn = search.get("relearn")
    if isinstance(relearn, dict):
        lines.append(f"relearn   {relearn_line(relearn)}")
    if any(isinstance(search.get(stage), dict) for stage in ("stage1", "stage2")):
        figures = certainty_figures(search)
        lines.append("certainty " + (figures[0] if figures else ""))
        lines += [f"          {line}" for line in figures[1:]]
        lines += [f"          WARNING: {w}" for w in certainty_warnings(search)]
    if search.get("method") == "combine":
        combined = search["combine"]
        lines.append(f"combined  {combined['method']} of {', '.join(i['path'] for i in combined['inputs'])}")
    lines += [""] + top_bottom_table(ranking, top, selection)
    whole = f" (whole {', '.join(selection.groups)})" if selection.groups else ""
    lines += ["", f"at {selection.mode} {selection.fraction:g}{whole}: kept {len(selection.kept)}, dropped {len(selection.dropped)}"]
    if requested_groups and not selection.groups:
        lines.append(f"--fused-groups: {no_groups_note(requested_groups)}")
    lines += ["", "per type (kept/all):"]
    lines += [f"  {kind:<24} {k}/{n}" for kind, k, n in _per_group(selection, module_kind)]
    blocks = _per_group(selection, block_index)
    lines += ["", "per block (kept/all):", "  " + "  ".join(f"{'head' if b is None else b}:{k}/{n}" for b, k, n in blocks)]
    return "\n".join(lines)


# --------------------------------------------------------------------------- commands


def cmd_search(args: argparse.Namespace) -> int:
    from axolotl_ila.plugin import search_config_file

    config = Path(args.config)
    if not config.is_file():
        raise UsageError(f"config {config} does not exist")
    plan = search_config_file(str(config))
    ranking_path = Path(plan.ranking_identity["path"])
    ranking = load_ranking(ranking_path)
    print("\n".join(top_bottom_table(ranking)))
    print(f"\nranking written to {ranking_path}, heatmap {ranking_path.with_suffix('.png')}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    path = args.ranking
    ranking = load_ranking(path)
    groups = tuple(FUSED_GROUPS) if args.fused_groups else ()
    selection = _selection(ranking, args.drop_fraction, args.keep_fraction, groups)
    if args.json:
        print(json.dumps(show_json(ranking, selection, path), indent=2))
    else:
        print(show_text(ranking, selection, path, args.top, requested_groups=groups))
    if args.png:
        from axolotl_ila.report.heatmap import heatmap

        out = heatmap(ranking, args.png, drop_fraction=args.drop_fraction, keep_fraction=args.keep_fraction, groups=groups)
        print(f"heatmap written to {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _load_all(paths: list[str]) -> tuple[list[Ranking], list[RankingFile]]:
    """Rankings from local or hf:// paths, and where each was read."""
    files = [locate_ranking(p) for p in paths]
    return [load_ranking(f.local_path, label=f.spec) for f in files], files


def cmd_compare(args: argparse.Namespace) -> int:
    if not 0.0 < args.top <= 1.0:
        raise UsageError(f"--top must be in (0, 1], got {args.top}")
    rankings, files = _load_all(args.rankings)
    labels = [f.spec for f in files]
    result = compare(rankings, labels, p=args.top)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    short = [Path(label).stem for label in labels]
    width = max(8, *map(len, short))
    size = len(top_set(rankings[0], args.top))
    print(f"Jaccard similarity of the top-{args.top:g} sets ({size} of {len(rankings[0].names)} modules each)")
    print(" " * width + "  " + "  ".join(f"{s:>{width}}" for s in short))
    for label, row in zip(short, result.matrix):
        print(f"{label:>{width}}  " + "  ".join(f"{v:>{width}.3f}" for v in row))
    print()
    for pair in result.to_json()["pairs"]:
        print(f"{Path(pair['a']).stem} vs {Path(pair['b']).stem}: {pair['jaccard']:.3f}")
    print(f"\nin every top set: {len(result.in_all)} modules; in some but not all: {len(result.in_some)}")
    if result.in_some:
        print("  " + ", ".join(result.in_some[:12]) + (" ..." if len(result.in_some) > 12 else ""))
    return 0


def _same_file(a: str | Path, b: str | Path) -> bool:
    if is_hub_path(str(a)) or is_hub_path(str(b)):
        return str(a) == str(b)
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)  # also through links
    return a.resolve() == b.resolve()


def cmd_combine(args: argparse.Namespace) -> int:
    for source in args.rankings:
        if _same_file(args.output, source):
            raise UsageError(
                f"-o {args.output} is one of the input rankings ({source}); write the combined "
                f"ranking to a new file, so that the inputs stay as they are"
            )
    rankings, files = _load_all(args.rankings)
    labels, digests = [f.spec for f in files], [file_digest(f.local_path) for f in files]
    combined = combine(rankings, labels, method=args.method, k_fraction=args.k_fraction, digests=digests)
    save_ranking(combined, args.output)
    print(f"combined {len(rankings)} rankings ({args.method}) into {args.output}")
    details = combined.search["combine"]
    if args.method == "intersect":
        least = details["least_important"]
        print(
            f"least important in every input's bottom {details['k']}: {len(least)} modules"
            + (f"; to drop exactly these, set ila_drop_fraction: {details['drop_fraction_for_intersection']}" if least else "; nothing is common to all bottom sets")
        )
        for name in least:
            print(f"  {name}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from axolotl_ila.cli.quickstart import run_quickstart

    return run_quickstart(args.dir)


RANKING_HELP = "a ranking file, or hf://OWNER/REPO[@REVISION]/PATH.json on the Hugging Face Hub"


def _search_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="axolotl config YAML with axolotl_ila.ILAPlugin and ila_ranking (a local path)")


def _show_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ranking", help=RANKING_HELP)
    p.add_argument("--png", help="write the heatmap (block x module type) to this PNG")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--drop-fraction", type=float, help="mark the least important fraction as dropped (default 0.25)")
    group.add_argument("--keep-fraction", type=float, help="mark all but the top fraction as dropped")
    p.add_argument("--fused-groups", action="store_true", help="keep or drop each block's q/k/v and gate/up/down together, as ila_fused_groups: true does")
    p.add_argument("--top", type=int, default=10, help="modules shown at each end (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rankings", nargs="+", help=RANKING_HELP + " (two or more)")
    p.add_argument("--top", type=float, default=0.75, help="p, the top fraction compared (default 0.75)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _combine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("rankings", nargs="+", help=RANKING_HELP + " (two or more)")
    p.add_argument("-o", "--output", required=True, help="ranking file to write (local; upload it with `hf upload`)")
    p.add_argument("--method", choices=COMBINE_METHODS, default="intersect")
    p.add_argument("--k-fraction", type=float, default=0.25, help="intersect: K as a fraction of the modules (default 0.25)")


def _quickstart_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", default="ila-quickstart", help="where to build (default ila-quickstart)")


@dataclass(frozen=True)
class Command:
    """One subcommand: what it runs, its one-line help, and its arguments."""

    run: Callable[[argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]


DESCRIPTION = "ILA layer importance for Axolotl: search, show, compare and combine rankings."
COMMANDS: dict[str, Command] = {
    "search": Command(cmd_search, "run the search a config describes and write its ila_ranking (+ heatmap PNG)", _search_arguments),
    "show": Command(cmd_show, "table of a ranking, and optionally its heatmap", _show_arguments),
    "compare": Command(cmd_compare, "Jaccard similarity of the top-p sets, for every pair", _compare_arguments),
    "combine": Command(cmd_combine, "one ranking from several of the same model", _combine_arguments),
    "quickstart": Command(cmd_quickstart, "build a tiny model and data, and train it with ILA (CPU, about a minute)", _quickstart_arguments),
}


def build_parser(prog: str = "axolotl-ila") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help, description=command.help))
    return parser


def main(argv: list[str] | None = None, prog: str = "axolotl-ila") -> int:
    """Run one command; ``prog`` is how the user called it (``axolotl ila`` too)."""
    args = build_parser(prog).parse_args(argv)
    try:
        if args.command in ("compare", "combine") and len(args.rankings) < 2:
            raise UsageError(f"{args.command} needs at least two rankings")
        return COMMANDS[args.command].run(args)
    except BrokenPipeError:  # output piped into `head`
        sys.stderr.close()
        return 0
    except (UsageError, RankingError, SelectionError, ValueError, FileNotFoundError) as exc:
        message = " ".join(str(exc).split())
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
