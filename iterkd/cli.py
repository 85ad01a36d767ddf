"""Command line: `iterkd search | spaces | report | export | compare | select | dashboard | bench`. User mistakes
(IterkdError) are printed as one line with a non-zero exit; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from .config import (
    SETTING_TYPES,
    SETTINGS,
    Range,
    build_config,
    check_name,
    default_note,
    flag,
    preset_values,
    resume_config,
)
from .device import COMPILE_MODES
from .errors import IterkdError
from .quantize import DEFAULT_CALIBRATION, DEFAULT_QAT_TEACHER, QAT_TEACHERS
from .run import read_config


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, systemd, job schedulers): stop like Ctrl-C, the running trial failed and resumable."""


def _terminate(signum, frame):
    raise Terminated


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        raise IterkdError(f"{message} (see '{self.prog} --help')")


def _number(text: str) -> float:
    """A number, or a fraction such as 1/8 (widths read best that way). Its range is checked with the config."""
    try:
        num, _, den = text.partition("/")
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"expected a number (or a fraction such as 1/8), got {text!r}"
        ) from None


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def _int_in(valid: Range):
    """An argparse type: an integer within `valid`, refused in one line that names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not valid.admits(value, integer=True):
            raise argparse.ArgumentTypeError(f"must be {valid.describe(integer=True)}, got {value}")
        return value

    return parse


SEARCH_GROUPS = {
    "search": "what to search",
    "run": "run",
    "training": "training (override the preset)",
    "speed": "speed (docs/performance.md)",
}


def flag_options(name: str) -> dict:
    """How argparse reads a setting's flag, from the setting's type: switches, repeats, numbers."""
    kind, meta = SETTING_TYPES[name], SETTINGS[name].metadata
    if kind is bool and flag(name).startswith("--no-"):
        return dict(action="store_const", const=False)
    if kind is bool:
        return dict(type=_on_off, metavar="on|off")
    if kind is tuple:
        return dict(action="append", metavar=meta.get("metavar"))
    metavar = meta.get("metavar") or {int: "N", float: "X"}.get(kind)
    if metavar is None:
        metavar = "NAME" if "choices" in meta else name.upper()
    return dict(type={int: int, float: _number, str: str}[kind], metavar=metavar)


def flag_help(name: str) -> str:
    """A setting's help text with its valid names and its default (or each preset's value)."""
    meta = SETTINGS[name].metadata
    text = meta["help"]
    if "choices" in meta:
        text += f"; one of {', '.join(meta['choices'])}"
    note = default_note(name)
    if note is None:
        return text
    return f"{text} ({note})" if preset_values(name) else f"{text} (default: {note})"


# Every setting is a flag; its dest is the field's name (the one hop from flag to config).
CONFIG_FLAGS = tuple(SETTINGS)


def _add_search_flags(p: argparse.ArgumentParser) -> None:
    groups = {key: p.add_argument_group(title) for key, title in SEARCH_GROUPS.items()}
    for name, f in SETTINGS.items():
        help_text = flag_help(name).replace("%", "%%")  # argparse %-formats help texts
        groups[f.metadata["group"]].add_argument(flag(name), dest=name, help=help_text, **flag_options(name))
    groups["run"].add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace):
    """The run's config: a saved run's own settings when its directory has one (resume), else the
    preset with the explicit flags on top."""
    explicit = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k, None) is not None}
    if "name" in explicit:  # before runs/NAME is looked at: '..' would be runs/'s parent
        check_name(explicit["name"])
    if "teacher" in explicit:  # --teacher may be repeated (an ensemble root)
        explicit["teacher"] = tuple(explicit["teacher"])
    run_dir = Path(explicit.get("run_dir") or Path("runs") / explicit.get("name", "run"))
    saved = read_config(run_dir)  # the run's own settings, its paths in run_dir (where the user says it is)
    if saved is not None:
        return resume_config(saved, explicit), True
    for teacher in explicit.get("teacher", ()):
        if not Path(teacher).is_file():
            raise IterkdError(f"teacher checkpoint {teacher} does not exist")
    preset = explicit.pop("preset", None) or _auto_preset(explicit.get("device", "auto"))
    explicit["run_dir"] = str(run_dir)
    return build_config(preset, explicit), False


def _auto_preset(device: str) -> str:
    import torch

    return "full" if device != "cpu" and torch.cuda.is_available() else "quick"


def cmd_search(args) -> int:
    from .lineage import epochs_summary, nodes, test_text
    from .search import Search, summary_table
    from .sizes import size_changes
    from .storage import redact_url

    cfg, resumed = config_from_args(args)
    print(
        f"iterkd: {'resuming' if resumed else 'starting'} run {cfg.name!r} in {cfg.run_dir} "
        f"(preset {cfg.preset}, space {cfg.space}, dataset {cfg.dataset}, variant {cfg.variant}, "
        f"max-drop {cfg.max_drop:g})" + (f", storage {redact_url(cfg.storage)}" if cfg.storage else "")
    )
    previous = signal.signal(signal.SIGTERM, _terminate)  # kill, systemd and schedulers: as Ctrl-C
    try:
        search = Search(cfg, progress=not args.no_progress)
        out = search.run()
    except KeyboardInterrupt as e:
        print(
            f"\niterkd: {'terminated' if isinstance(e, Terminated) else 'interrupted'}; finished nodes are kept. "
            f"Resume with: iterkd resume {cfg.run_dir}",
            file=sys.stderr,
        )
        return 143 if isinstance(e, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_rows", 200):
        print(summary_table(search.study).to_string(index=False))
    r, f = out.root, out.final
    print(f"stopped: {out.stop_reason}")
    print(
        f"final model: node {f.node} {f.spec.summary()}: {size_changes(search.size, r.spec, f.spec)}; "
        f"val {f.val_acc:.2f}% (drop {r.val_acc - f.val_acc:.2f} pts), {test_text(f.test_acc)}"
    )
    epochs = epochs_summary(nodes(search.study))
    if epochs:
        print(f"epochs: {epochs}")
    print(f"lineage: {Path(cfg.run_dir) / 'lineage.csv'}  ({out.seconds:.0f}s this session)")
    from .report import write_report

    print(f"report: {write_report(cfg.run_dir, storage=cfg.storage).html}")
    return 0


def cmd_resume(args) -> int:
    """`iterkd resume RUN`: `search` on an existing run, its settings read from RUN/config.json."""
    if not Path(args.run).is_dir() or read_config(Path(args.run)) is None:
        raise IterkdError(
            f"no run to resume at {args.run} (no config.json there); start one with iterkd search"
        )
    args.run_dir = args.run
    return cmd_search(args)


def cmd_report(args) -> int:
    from .report import write_report

    report = write_report(args.run_dir, storage=args.storage, fmt=args.format)
    for gap in report.gaps:
        print(f"iterkd: partial report, missing {gap}", file=sys.stderr)
    print(
        f"report: {report.html}  (Markdown: {report.markdown}; table: {', '.join(map(str, report.tables))})"
    )
    return 0


def cmd_spaces(args) -> int:
    from .spaces import available_spaces, load_space

    for name in available_spaces():
        space = load_space(name)
        root = space.root_spec(3, 10, 32)
        ops = ", ".join(op for op, _ in space.operators)
        print(f"{name:<14} root {root.summary():<44} {root.params():>12,} params  ops: {ops}")
        if space.description:
            print(f"{'':<14} {space.description}")
    return 0


def cmd_select(args) -> int:
    from . import objective
    from .lineage import drop_selections, node_status, set_selection
    from .run import open_run
    from .storage import set_status

    run = open_run(args.run, storage=args.storage)
    by_id = run.nodes
    node = by_id.get(args.node)
    if node is None or not node.ok:
        raise IterkdError(
            f"node {args.node} is not a trained node of {args.run}; "
            f"trained nodes: {', '.join(str(i) for i, n in sorted(by_id.items()) if n.ok)}"
        )
    # Growing from an earlier node abandons the selections made after it (the selection log keeps them).
    drop_selections(run.study, from_generation=node.generation + 1)
    set_selection(run.study, node.generation, [node.node], by="user")
    # Until a resume goes on from it, the chosen node is the run's answer: report, export and
    # compare use it, and Optuna's best trial (the dashboard's badge) names it.
    run.study.set_user_attr("final_node", node.node)
    objective.agree(run.study, node)
    chosen = run.accepted
    for n in by_id.values():  # the dashboard's status column follows the new choice
        set_status(run.study, n.node, node_status(n, chosen))
    run.study.set_user_attr("stop_reason", "")
    print(
        f"node {node.node} ({node.spec.summary()}, {node.spec.params():,} params, val {node.val_acc:.2f}%) "
        f"is now the parent of generation {node.generation + 1}; continue with: iterkd resume {args.run}"
    )
    return 0


def cmd_worker(args) -> int:
    """`iterkd worker`: train the nodes a coordinator queued, until its search is over."""
    from .storage import default_storage
    from .worker import STORAGE_ENV, run_worker

    saved = read_config(Path(args.run_dir)) if args.run_dir else None
    name = args.run or (saved.name if saved else None)
    if not name:
        raise IterkdError(
            "iterkd worker needs --run NAME (the coordinator's --name) or --run-dir of an existing run"
        )
    storage = args.storage or os.environ.get(STORAGE_ENV)
    if not storage and saved and saved.storage and "***" not in saved.storage:
        storage = saved.storage
    if not storage and args.run_dir and not (saved and saved.storage):
        storage = default_storage(Path(args.run_dir))
    if not storage:
        raise IterkdError(
            "iterkd worker needs --storage URL (the coordinator's; passwords are never saved), "
            "e.g. postgresql://USER@HOST/DB"
        )
    try:
        run_worker(
            storage,
            name,
            run_dir=args.run_dir,
            device=args.device,
            data_dir=args.data_dir,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print(
            "\niterkd: worker stopped; its node failed and the coordinator queues it again", file=sys.stderr
        )
        return 130
    return 0


def cmd_dashboard(args) -> int:
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise IterkdError("the dashboard needs optuna-dashboard: pip install optuna-dashboard") from None
    from optuna.artifacts import FileSystemArtifactStore

    from .run import open_run

    run = open_run(args.run, storage=args.storage)
    print(
        f"iterkd: serving run {run.cfg.name!r} at http://{args.host}:{args.port}/dashboard (Ctrl-C to stop)",
        flush=True,
    )
    try:
        run_server(
            run.storage,
            host=args.host,
            port=args.port,
            artifact_store=FileSystemArtifactStore(str(Path(args.run) / "artifacts")),
        )
    except OSError as e:
        raise IterkdError(
            f"cannot serve on {args.host}:{args.port} ({e.strerror}); choose another --port"
        ) from None
    return 0


def cmd_bench(args) -> int:
    import json

    import torch

    from .bench import PLANS, run_bench
    from .device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    for figures in run_bench(device, PLANS[device.type, args.quick], compile=args.compile):
        print(json.dumps(figures), flush=True)
    return 0


def cmd_export(args) -> int:
    from .export import Int8Request, export_command, export_node, parse_formats
    from .run import open_run

    formats = parse_formats(args.format)
    int8 = None
    if not (args.int8 or args.qat_epochs):
        extra = [f for f, v in (("--calibration", args.calibration), ("--force", args.force)) if v]
        if extra:
            raise IterkdError(
                f"{' and '.join(extra)} {'is' if len(extra) == 1 else 'are'} only for int8 exports; "
                "add --int8 (or --qat-epochs N)"
            )
    else:
        int8 = Int8Request(
            calibration=args.calibration,
            qat_epochs=args.qat_epochs,
            qat_teacher=args.qat_teacher,
            force=args.force,
            threads=args.threads,
            progress=sys.stderr.isatty(),
        )
    run = open_run(args.run, storage=args.storage)
    node = run.node(args.node)
    bench_md = ""
    if args.bench:
        from .deploy import bench_note, compare
        from .export import markdown_table

        headers, rows = compare(
            {f"root (node {run.root.node})": run.model(run.root), f"node {node.node}": run.model(node)},
            threads=args.threads,
        )
        width = max(len(r[0]) for r in rows)
        for row in [headers] + rows:
            print(f"{row[0]:<{width}}  " + "  ".join(f"{c:>16}" for c in row[1:]))
        print(bench_note(args.threads))
        bench_md = markdown_table(headers, rows) + "\n\n" + bench_note(args.threads)
    out = export_node(
        run,
        node,
        formats,
        args.out,
        data_dir=args.data_dir,
        bench_md=bench_md,
        command=export_command(run, node, formats, args.out and Path(args.out), args.bench, int8),
        int8=int8,
    )
    print(
        f"exported node {out.node} ({node.spec.summary()}, {node.spec.params():,} params, val {node.val_acc:.2f}%) "
        f"of run {run.cfg.name} to {out.out_dir}:"
    )
    for fmt, diff in out.max_abs_diff.items():
        path = out.files[fmt]
        print(
            f"  {path.name:<22} {path.stat().st_size:>12,} bytes  max abs diff {diff:.2g} "
            f"vs PyTorch on the run's validation images"
        )
    if out.int8:
        f = out.int8.figures
        for label, g in (("post-training int8", out.int8.ptq), (f"{f.method.upper()} int8", f)):
            if g is None:
                continue
            print(
                f"  {label}: val {g.val_acc:.2f}% (fp32 {g.fp32_val_acc:.2f}%, drop vs root {g.drop_pts:.2f} pts, "
                f"{'within' if g.within_budget else 'OVER'} --max-drop {g.max_drop:g}), test {g.test_acc:.2f}% "
                f"(fp32 {g.fp32_test_acc:.2f}%), top-1 agreement {g.agreement_val:.2f}% / {g.agreement_test:.2f}%; "
                f"onnxruntime batch 1 {g.latency_ms_b1:.3f} ms (fp32 {g.fp32_latency_ms_b1:.3f}), "
                f"batch 64 {g.throughput_b64:,.0f} img/s (fp32 {g.fp32_throughput_b64:,.0f})"
            )
        print(
            f"  {out.int8.path.name:<22} {f.int8_bytes:>12,} bytes  (fp32 ONNX, BN folded: {f.fp32_bytes:,})"
        )
    print(f"  spec.json, {out.card.name}")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_run, text_table

    try:
        c = compare_run(
            args.run,
            seeds=args.seeds,
            search_seeds=args.search_seeds,
            epochs=args.epochs,
            preset=args.preset,
            device=args.device,
            data_dir=args.data_dir,
            storage=args.storage,
            progress=not args.no_progress,
            rows=args.rows,
        )
    except KeyboardInterrupt:
        print(
            f"\niterkd: interrupted; finished models are kept in {Path(args.run) / 'compare.json'} and searches "
            f"in {Path(args.run) / 'compare'}. "
            f"Resume with: iterkd compare {args.run}",
            file=sys.stderr,
        )
        return 130
    print(text_table(c.rows, c.images_per_epoch))
    print(c.verdict.replace("**", "").replace("`", ""))
    print(f"compare: {c.markdown_path}  (per seed: {c.json_path}; {c.trained} models trained now)")
    return 0


def cmd_data(args) -> int:
    """`iterkd data list` / `iterkd data remove KEY`: the decoded dataset stores (iterkd.data.store)."""
    from .data.store import list_stores, remove_store, store_bytes, store_root

    root = store_root()
    if args.action == "remove":
        if not args.key:
            raise IterkdError(
                "iterkd data remove needs KEY (a store's key or a unique prefix; `iterkd data list`)"
            )
        freed = remove_store(args.key)
        print(f"removed store {args.key} from {root} ({freed / 2**20:,.1f} MB freed)")
        return 0
    stores = list_stores()
    if not stores:
        print(f"no dataset stores under {root}")
        return 0
    rows = [
        [
            s.key,
            s.meta["name"],
            f"{len(s.labels):,}",
            str(len(s.meta["classes"])),
            f"{s.meta['channels']}x{s.meta['size']}x{s.meta['size']}",
            f"{store_bytes(s.path) / 2**20:,.1f}",
            s.meta.get("source", ""),
        ]
        for s in stores
    ]
    print(f"dataset stores under {root} (ITERKD_STORE):")
    print(text_columns(["key", "dataset", "images", "classes", "shape", "MB", "source"], rows))
    return 0


def text_columns(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [headers, *rows]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="iterkd", description="Iterative knowledge-distillation compression search.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    p = sub.add_parser("search", help="run (or resume) a compression search")
    _add_search_flags(p)
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("resume", help="continue a stopped or crashed run with its saved settings")
    p.add_argument("run", metavar="RUN", help="the run directory, e.g. runs/run")
    _add_search_flags(p)  # only the settings that do not change what a node is may differ (else an error)
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser(
        "worker",
        help="train nodes that a coordinator (iterkd search --workers N) queued; "
        "start any number, on any machine (docs/distributed.md)",
    )
    p.add_argument(
        "--storage", help="the coordinator's storage URL (or $ITERKD_STORAGE; default: RUN_DIR's study.db)"
    )
    p.add_argument("--run", help="the run's name (the coordinator's --name); default: read from --run-dir")
    p.add_argument(
        "--run-dir",
        help="the run directory as this machine sees it (shared filesystem); default: the coordinator's",
    )
    p.add_argument("--device", help="auto, cpu or cuda (default: the run's)")
    p.add_argument("--data-dir", help="where datasets live on this machine")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_worker)
    p = sub.add_parser(
        "spaces", help="list the shipped search spaces with their root size (3x32x32, 10 classes)"
    )
    p.set_defaults(func=cmd_spaces)
    p = sub.add_parser(
        "select", help="make a node the parent of the next generation (overrides the automatic choice)"
    )
    p.add_argument("run", help="run directory")
    p.add_argument("--node", type=int, required=True, help="node id (see lineage.csv)")
    p.add_argument(
        "--storage", help="the run's storage URL when it is not RUN/study.db (passwords are not saved)"
    )
    p.set_defaults(func=cmd_select)
    p = sub.add_parser("dashboard", help="serve the run's study with optuna-dashboard (loopback by default)")
    p.add_argument("run", help="run directory")
    p.add_argument("--port", type=_int_in(Range(1, 65535)), default=8080, help="TCP port (default 8080)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument(
        "--storage", help="the run's storage URL when it is not RUN/study.db (passwords are not saved)"
    )
    p.set_defaults(func=cmd_dashboard)
    p = sub.add_parser("report", help="write RUN/report.html and report.md (tree, accuracy vs size, tables)")
    p.add_argument("run_dir", metavar="RUN", help="the run directory, e.g. runs/run")
    p.add_argument(
        "--format",
        choices=("csv", "parquet"),
        default="csv",
        help="lineage table format: csv (always written) or parquet too (needs pyarrow)",
    )
    p.add_argument(
        "--storage", help="the run's storage URL when it is not in RUN (a password is never saved)"
    )
    p.set_defaults(func=cmd_report)
    p = sub.add_parser(
        "bench",
        help="training speed of the root, a child, and the child distilled live or from "
        "the teacher cache: one JSON line per case (docs/performance.md)",
    )
    p.add_argument("--quick", action="store_true", help="a small run (CPU: under 2 minutes)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--compile", default="auto", choices=COMPILE_MODES, help="torch.compile mode (default auto)"
    )
    p.add_argument(
        "--threads", type=_int_in(Range(1)), help="CPU threads for PyTorch (default: its own choice)"
    )
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser(
        "export",
        help="write a run's node (default: its final model) as ONNX / TorchScript / "
        "safetensors with a model card, verified on validation images",
    )
    p.add_argument("run", help="run directory (runs/NAME)")
    p.add_argument("--node", type=int, help="node number (default: the run's final accepted model)")
    p.add_argument("--format", default="all", help="onnx, torchscript, safetensors or all (default)")
    p.add_argument("-o", "--out", help="output directory (default RUN/export/node-N)")
    p.add_argument(
        "--bench",
        action="store_true",
        help="measure CPU latency (batch 1), throughput (batch 64) and ONNX size of root and node",
    )
    p.add_argument(
        "--threads",
        type=_int_in(Range(1)),
        default=1,
        help="CPU threads for --bench and int8 timing (default 1)",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx: ONNX Runtime static quantisation (QDQ, per-channel int8 weights), "
        "verified against fp32 and refused when its drop exceeds the run's --max-drop (docs/export.md)",
    )
    p.add_argument(
        "--calibration",
        type=_int_in(Range(1)),
        metavar="N",
        help=f"training images that calibrate the int8 activation ranges (default {DEFAULT_CALIBRATION}, "
        "or all of a smaller training set)",
    )
    p.add_argument(
        "--qat-epochs",
        type=_int_in(Range(0)),
        default=0,
        metavar="N",
        help="quantisation-aware distillation: fine-tune the node N epochs with fake quantisation and KD "
        "before quantising (implies --int8; default 0: post-training only)",
    )
    p.add_argument(
        "--qat-teacher",
        choices=QAT_TEACHERS,
        default=DEFAULT_QAT_TEACHER,
        help=f"teacher of --qat-epochs: the node's own fp32 weights or the root (default {DEFAULT_QAT_TEACHER})",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="export the int8 model even when its validation drop exceeds the run's --max-drop",
    )
    p.add_argument(
        "--storage", help="the run's storage URL when it is not RUN/study.db (passwords are not saved)"
    )
    p.add_argument(
        "--data-dir", help="where the run's dataset is, for the verification images (default: the run's)"
    )
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "compare",
        help="did the search pay off? the final architecture from scratch and with KD from the "
        "root, the root pruned with Torch-Pruning, at one child's and at the chain's compute, over "
        "seeds, beside the run's result, with a verdict (docs/compare.md)",
    )
    p.add_argument("run", help="run directory (runs/NAME)")
    p.add_argument("--seeds", type=int, default=3, metavar="N", help="seeds 0..N-1 per baseline (default 3)")
    p.add_argument(
        "--search-seeds",
        type=int,
        default=1,
        metavar="M",
        help="searches behind the iterkd row: the run and M-1 reruns of its search with seeds "
        "seed+1.. in RUN/compare/ (default 1: the run alone)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs of the equal-epochs rows (default: the run's epochs per child; the "
        "chain- and paid-compute rows always train the chain's and the search's)",
    )
    p.add_argument(
        "--preset", help="take the epochs per child of this preset (smoke, quick, full); --epochs wins"
    )
    p.add_argument(
        "--rows",
        metavar="LIST",
        help="train and show only these baselines, comma-separated: scratch (labels only), kd (one-shot "
        "KD), kd-chain, prune, kd-paid, inherit-paid (default: all); a verdict needs its compute's rows",
    )
    p.add_argument("--device", help="auto, cpu or cuda (default: the run's)")
    p.add_argument("--data-dir", help="where the run's dataset is (default: the run's)")
    p.add_argument(
        "--storage", help="the run's storage URL when it is not RUN/study.db (passwords are not saved)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser(
        "data",
        help="list or remove the decoded dataset stores (under $ITERKD_STORE, else ~/.cache/iterkd/stores)",
    )
    p.add_argument("action", choices=("list", "remove"))
    p.add_argument(
        "key", nargs="?", help="remove: the store's key (or a unique prefix) from `iterkd data list`"
    )
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except IterkdError as e:
        print(f"iterkd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
