"""The ``squeezer`` command line: demo, inspect, compress, tune, search, run, bench, passes."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from importlib.metadata import entry_points
from typing import Callable, Sequence

from compiler.errors import SqueezerError
from compiler.registry import load_recipe, parse_pass_spec

from .launch import add_launch_args


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import VARIANTS, default_recipe, run_demo
    from .launch import relaunch, wants_launch
    from .recipes.stages import Recipe

    if args.variant and args.passes:
        raise SqueezerError("demo: give --variant or --pass, not both")
    if args.no_passes:
        recipe = Recipe(())
    elif args.variant:
        recipe = VARIANTS[args.variant]
    else:
        recipe = default_recipe([parse_pass_spec(s) for s in args.passes] if args.passes else None)
    if args.finetune is not None:
        recipe = recipe.with_first_finetune(epochs=args.finetune)
    if wants_launch(args):
        return relaunch(args.argv, args)
    run_demo(out_dir=args.out, recipe=recipe, retrain=args.retrain, progress=not args.quiet,
             checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .models import example_inputs_for, load_model
    from compiler.summary import summarize
    from compiler.tracing import trace

    graph = trace(load_model(args.model), example_inputs_for(args.model, args.input_shape, args.batch))
    summary = summarize(graph)
    if args.json:
        print(summary.to_json(indent=2))
    else:
        if args.graph:
            print(graph)
            print()
        print(summary.table())
    return 0


def _cmd_compress(args: argparse.Namespace) -> int:
    import codegen

    from .data import load_training_data
    from .launch import relaunch, wants_launch
    from .models import example_inputs_for, load_model
    from .paths import check_database_dir, out_dir
    from compiler.distributed import init_from_env
    from compiler.summary import summarize
    from compiler.tracing import trace

    # everything the user typed is checked before the trace, the passes and the build (minutes)
    passes = (load_recipe(args.recipe) if args.recipe else []) + [parse_pass_spec(s) for s in args.passes]
    target = codegen.resolve_target(args.target)
    database = check_database_dir(args.database) if args.database else None
    trainers = [p.name for p in passes if getattr(p, "train_data", False) is None]   # passes that train (SSL, SFP)
    if args.finetune is not None and args.data is None or args.data is not None and args.finetune is None and not trainers:
        raise SqueezerError("compress: --finetune EPOCHS and --data go together (fine-tuning needs training data)")
    if trainers and args.data is None:
        raise SqueezerError(f"compress: {', '.join(trainers)} trains on data: give --data mnist or a .npz/.safetensors file")
    if args.grad_compression != "none" and not args.finetune:
        raise SqueezerError("compress: --grad-compression applies to the --finetune training: give --finetune EPOCHS")
    data = load_training_data(args.data) if args.data is not None else None
    passes = [replace(p, train_data=data) if getattr(p, "train_data", False) is None else p for p in passes]
    if wants_launch(args):
        return relaunch(args.argv, args)
    w = init_from_env()
    with out_dir(args.out, force=args.force) if w.is_main else contextlib.nullcontext() as out:
        model = load_model(args.model)
        graph = trace(model, example_inputs_for(args.model, args.input_shape, args.batch))
        before = summarize(graph)
        graph = _compressed(graph, passes, args, data)
        if not w.is_main:
            return 0
        after = summarize(graph)
        compiled = codegen.build(graph, target, database=database)
        compiled.export(out)
        weights = compiled.weight_report()
        report = {"model": args.model, "passes": graph.history, "target": compiled.target,
                  "before": before.to_dict()["total"], "after": after.to_dict()["total"],
                  "reports": [r.to_dict() for r in graph.reports], "export_dir": str(out),
                  "deployable_weights": weights}
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    for r in graph.reports:
        print(r)
    print(after.table())
    if weights["encoded_bytes"]:
        print(f"deployable weights: {weights['deployable_bytes']:,} bytes (weights.bin {weights['encoded_bytes']:,} "
              f"encoded + {weights['embedded_bytes']:,} in model.so)")
    print(f"exported to {out} (report.json beside it)")
    return 0


def _compressed(graph, passes: list, args: argparse.Namespace, data):
    """The passes (decided on rank 0 in a distributed run), then, with ``--finetune``, distillation
    from the uncompressed model on ``data`` (DDP under torchrun, checkpointed when asked)."""
    from torch.utils.data import TensorDataset

    from compiler.distributed import decided_on_main, main_only
    from compiler.finetune import TrainConfig, train
    from compiler.pipeline import Pipeline

    teacher = graph.module
    verify = args.verify if args.verify is not None else False
    compressed = decided_on_main(lambda: Pipeline(passes, verify=verify)(graph))
    if data is not None and args.finetune:
        x, y = data
        shape = tuple(graph.example_inputs[0].shape[1:])
        if tuple(x.shape[1:]) != shape:
            raise SqueezerError(f"compress: --data {args.data}: inputs of shape {tuple(x.shape[1:])}, but the model "
                                f"takes {shape}")
        config = TrainConfig(epochs=args.finetune, lr=args.lr, batch_size=args.train_batch, progress=not args.quiet,
                             checkpoint_dir=args.checkpoint_dir, checkpoint_every=args.checkpoint_every,
                             grad_compression=args.grad_compression, terngrad_clip=args.terngrad_clip)
        history = train(compressed.module, TensorDataset(x, y), config, teacher=teacher)
        main_only(print)(f"fine-tuned {args.finetune} epoch(s) with distillation from the uncompressed model "
                         f"(final loss {history.losses[-1]:.4f})" if history.losses else "nothing to fine-tune")
    return compressed


def _cmd_tune(args: argparse.Namespace) -> int:
    import codegen

    from .models import example_inputs_for, load_model
    from compiler.pipeline import Pipeline
    from compiler.tracing import trace

    graph = trace(load_model(args.model), example_inputs_for(args.model, args.input_shape, args.batch))
    passes = (load_recipe(args.recipe) if args.recipe else []) + [parse_pass_spec(s) for s in args.passes]
    if passes:
        graph = Pipeline(passes)(graph)
    rpc = None
    if args.rpc:
        if not args.device_key:
            raise SqueezerError("tune: --rpc needs --device-key (the key the RPC servers registered with)")
        rpc = f"{args.rpc}@{args.device_key}"
    result = codegen.tune(graph, args.target, trials=args.trials, time_budget=args.time_budget,
                          database=args.database, rpc=rpc, progress=not args.quiet)
    print(json.dumps(result.to_dict(), indent=2))
    print(f"records in {args.database}; build with `squeezer compress ... --database {args.database}`")
    if result.stopped == "interrupted":   # Ctrl-C: what was measured is kept; 130 as a shell reports SIGINT
        print(f"squeezer tune: interrupted; {result.trials_run} records of this run kept", file=sys.stderr)
        return 130
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    """Hardware-aware per-layer search on the embedded default: the demo's trained LeNet-5, ranked
    by accuracy on held-out images of the demo dataset (for other models: squeezer.search.search)."""
    import codegen  # noqa: F401 - registers the compiled-latency provider (and sizes TVM's threads)

    from .data import mnist_subset
    from .demo import shared_baseline_model
    from .launch import relaunch, wants_launch
    from compiler.distributed import init_from_env
    from compiler.finetune import batches_of, evaluate
    from .search import search
    from compiler.tracing import trace

    goals = {"speedup": args.speedup, "latency_budget_ms": args.latency_budget, "compression": args.compression,
             "size_budget_bytes": args.size_budget}
    if sum(v is not None for v in goals.values()) != 1:
        raise SqueezerError("search: give exactly one goal: --speedup, --latency-budget, --compression or --size-budget")
    if wants_launch(args):
        return relaunch(args.argv, args)
    w = init_from_env()   # under torchrun the candidates are spread over the ranks; rank 0 reports
    quiet = args.quiet or not w.is_main
    model = shared_baseline_model(progress=not args.quiet, log=(lambda *_: None) if quiet else print)
    _, (xte, yte) = mnist_subset()
    val = batches_of(xte[:args.val], yte[:args.val], 250)
    graph = trace(model, (xte[:1],))
    result = search(graph, lambda m: evaluate(m, val), family_name=args.family, target=args.target,
                    rounds=args.rounds, **{k: v for k, v in goals.items() if v is not None})
    if not w.is_main:
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recipe = result.save_recipe(out / "recipe.txt")
    plots = result.plot(out)
    unit = "bytes" if result.metric.startswith("stored") else "ms"
    for label, c in (("untouched", result.baseline), ("searched", result.chosen), ("uniform", result.uniform)):
        if c is not None:
            print(f"{label:<10} {c.latency_ms:>12.4f} {unit}  accuracy {c.accuracy * 100:6.2f} %  "
                  f"{', '.join(f'{k}={v:g}' for k, v in sorted(c.ratios.items())) or '-'}")
    print(f"recipe: {recipe} (replay: squeezer compress MODEL --recipe {recipe} ...); plots: "
          f"{', '.join(str(p) for p in plots)}; {len(result.explored)} candidates measured")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    import codegen

    from compiler.errors import InputError

    m = codegen.load(args.dir, num_threads=args.num_threads)
    inputs = []
    for path in args.input or []:
        try:
            inputs.append(np.load(path, allow_pickle=False))
        except (OSError, ValueError) as exc:
            raise InputError(f"--input {path}: cannot read a .npy array ({exc})") from None
    inputs = inputs or m.random_inputs()
    out = m(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    for i, o in enumerate(outs):
        print(f"output{i}: shape {o.shape} dtype {o.dtype}\n{np.array2string(o, threshold=20)}")
    if args.benchmark:
        print(json.dumps(m.benchmark(*inputs), indent=2))
    return 0


def _cmd_passes(_args: argparse.Namespace) -> int:
    from compiler.registry import registered_passes

    passes = registered_passes()
    if not passes:
        print("no passes registered yet")
    for name, cls in passes.items():
        print(f"{name:<24}{(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else ''}")
    from passes.binarization import EXTENSIONS, METHODS

    print(f"\nbinarize methods (binarize:method=...): {', '.join(METHODS + tuple(EXTENSIONS))}")
    print("\ntraining options (compress --finetune; compiler.finetune.TrainConfig):")
    print(f"{'--grad-compression terngrad':<28}TernGrad (Wen et al. 2017): ternary gradients all-reduced by a DDP "
          "communication hook (--terngrad-clip C: clip at C·σ)")
    return 0


def _integer(least: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``least`` (argparse reports anything else in one line)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} must be >= {least}")
        return value
    return parse


def _number(*, positive: bool) -> Callable[[str], float]:
    """An argparse type: a finite float, > 0 (``positive``) or >= 0."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number {'> 0' if positive else '>= 0'}")
        return value
    return parse


COMMAND_PLUGIN_GROUP = "squeezer.commands"


def _plugin_command(name: str) -> Callable[[list[str]], int] | None:
    """A command that parses its own arguments, found in the ``squeezer.commands`` entry-point
    group (``bench`` lives in the benchmarks package, which sits above this one)."""
    for entry in entry_points(group=COMMAND_PLUGIN_GROUP):
        if entry.name == name:
            return entry.load()
    return None


def _no_plugin(args: argparse.Namespace) -> int:
    raise SqueezerError(f"{args.command}: its command comes from the {COMMAND_PLUGIN_GROUP!r} entry-point group, "
                        "which is not installed (pip install -e . from the project's root)")


BUILTIN_COMMANDS = ("demo", "inspect", "compress", "tune", "search", "run", "passes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="squeezer", description="Make neural networks small and fast.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="train/load LeNet-5 on MNIST, compress, compile, export, compare")
    d.add_argument("--out", help="export directory (default: a fresh temporary directory)")
    d.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="a pass spec such as channel-pruning:ratio=0.5 (repeatable; default: "
                        "channel-pruning:target_macs=0.5)")
    d.add_argument("--variant", choices=["pruning", "low-rank", "pruning+low-rank", "binarized", "binarized-tang",
                                         "deep-compression", "int8", "int8-qat"],
                   help="a preset compression: pruning (the default: channel pruning to half the MACs), "
                        "low-rank (spatially separable convs + SVD linears at 80%% energy), both, "
                        "binarized (XNOR-Net: 10 epochs of STE + distillation, packed into bits), "
                        "binarized-tang (±1 weights and activations trained as Tang et al. 2017, distilled), "
                        "deep-compression, int8 (post-training int8, calibrated on training batches) or "
                        "int8-qat (learned step sizes, 1 epoch of distillation, then int8)")
    d.add_argument("--no-passes", action="store_true", help="compile the original model as is")
    d.add_argument("--finetune", type=_integer(0), default=None, metavar="EPOCHS",
                   help="distillation fine-tuning epochs after compression (default 3, binarized 10, "
                        "deep-compression 6; 0 to skip)")
    d.add_argument("--retrain", action="store_true", help="ignore the cached baseline")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    add_launch_args(d, _integer)
    d.set_defaults(func=_cmd_demo)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="package.module:factory, or a zoo name (lenet5, residual, attention, ...)")
        sp.add_argument("--input-shape", action="append", metavar="SHAPE",
                        help="full input shape incl. batch, e.g. 1,3,32,32 (repeat per input)")
        sp.add_argument("--batch", type=_integer(1), default=1, help="batch for zoo models' example inputs")

    i = sub.add_parser("inspect", help="print the graph summary: params, MACs, stored bytes per layer")
    model_args(i)
    i.add_argument("--json", action="store_true")
    i.add_argument("--graph", action="store_true", help="also print the node table")
    i.set_defaults(func=_cmd_inspect)

    c = sub.add_parser("compress", help="trace, run passes, build and export a model")
    model_args(c)
    c.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC")
    c.add_argument("--recipe", help="file of pass specs (JSON list or one per line)")
    c.add_argument("--target", default="llvm", help="llvm (this CPU), cuda, or a JSON target")
    c.add_argument("--database", help="MetaSchedule tuning database directory")
    c.add_argument("--verify", type=_number(positive=False), help="check outputs after each pass within this tolerance")
    c.add_argument("--out", required=True, help="export directory: new, empty, or a previous Squeezer export "
                                                "(replaced); any other non-empty directory needs --force")
    c.add_argument("--force", action="store_true",
                   help="write the export into a non-empty --out that is not a Squeezer export "
                        "(model.so, weights.bin, manifest.json, report.json are overwritten; nothing else is touched)")
    c.add_argument("--finetune", type=_integer(0), default=None, metavar="EPOCHS",
                   help="after the passes, fine-tune this many epochs with distillation from the uncompressed model")
    c.add_argument("--data", help="training data for --finetune: 'mnist' (the demo's), or a .npz/.safetensors "
                                  "file with arrays x (inputs) and y (integer labels)")
    c.add_argument("--lr", type=_number(positive=True), default=1e-3, help="fine-tuning learning rate (Adam)")
    c.add_argument("--train-batch", type=_integer(1), default=64,
                   help="fine-tuning global batch (split over the --nproc workers)")
    c.add_argument("--grad-compression", choices=["none", "terngrad"], default="none",
                   help="gradient compression of the --finetune training: terngrad (Wen et al. 2017: ternary "
                        "gradients, unbiased, all-reduced as int8 codes by a DDP communication hook)")
    c.add_argument("--terngrad-clip", type=_number(positive=True), default=None, metavar="C",
                   help="TernGrad's gradient clipping at C standard deviations (the paper: 2.5)")
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    add_launch_args(c, _integer)
    c.set_defaults(func=_cmd_compress)

    t = sub.add_parser("tune", help="MetaSchedule-tune a model's kernels into a database directory")
    model_args(t)
    t.add_argument("--pass", dest="passes", action="append", default=[], metavar="SPEC",
                   help="passes to apply before tuning (tune what you will ship)")
    t.add_argument("--recipe", help="file of pass specs (JSON list or one per line)")
    t.add_argument("--target", default="llvm", help="llvm (this CPU), cuda, or a JSON target")
    t.add_argument("--trials", type=_integer(1), default=64, help="candidates to measure in this run (default 64)")
    t.add_argument("--time-budget", type=_number(positive=True), default=None, metavar="SECONDS", help="stop after this long")
    t.add_argument("--database", default="tuning_db", help="records directory (resumed when it exists)")
    t.add_argument("--rpc", metavar="HOST:PORT", help="measure on a remote device through this TVM RPC tracker")
    t.add_argument("--device-key", help="the RPC device key (with --rpc)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_cmd_tune)

    se = sub.add_parser("search", help="hardware-aware per-layer search (demo LeNet-5): recipe + plots")
    se.add_argument("--family", choices=["pruning", "low-rank", "sparsity", "bits", "int8"], default="pruning",
                    help="bits: weight-sharing clusters; int8: each layer int8 or float (mixed precision)")
    se.add_argument("--speedup", type=_number(positive=True), help="compiled latency goal: this many times faster")
    se.add_argument("--latency-budget", type=_number(positive=True), metavar="MS", help="compiled latency goal in ms")
    se.add_argument("--compression", type=_number(positive=True), help="size goal: stored weights this many times smaller")
    se.add_argument("--size-budget", type=_integer(1), metavar="BYTES", help="size goal in stored bytes")
    se.add_argument("--target", default="llvm")
    se.add_argument("--val", type=_integer(1), default=500, help="validation images ranking the candidates")
    se.add_argument("--rounds", type=_integer(1), default=5, help="latency measurements per candidate (median)")
    se.add_argument("--out", default="search-out", help="directory for recipe.txt and the plots")
    se.add_argument("--quiet", action="store_true")
    add_launch_args(se, _integer, checkpoints=False)
    se.set_defaults(func=_cmd_search)

    r = sub.add_parser("run", help="load an exported module and run it")
    r.add_argument("dir")
    r.add_argument("--input", action="append", help=".npy file per input (default: random)")
    r.add_argument("--benchmark", action="store_true")
    r.add_argument("--num-threads", type=_integer(1), default=None,
                   help="CPU threads per call (default: one per core this process may use)")
    r.set_defaults(func=_cmd_run)

    b = sub.add_parser("bench", help="run a benchmark suite: squeezer bench [suite] [options] (see bench --help)")
    b.set_defaults(func=_no_plugin)

    ps = sub.add_parser("passes", help="list registered passes")
    ps.set_defaults(func=_cmd_passes)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # torch.export's own deprecation chatter is not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\..*|copyreg")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    argv = list(sys.argv[1:] if argv is None else argv)
    plugin = _plugin_command(argv[0]) if argv and argv[0] not in BUILTIN_COMMANDS else None
    if plugin is not None:  # everything after the command's name belongs to the plugin (e.g. bench)
        return plugin(argv[1:])
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except SqueezerError as exc:
        print(f"squeezer {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
