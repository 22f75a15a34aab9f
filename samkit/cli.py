"""The ``samkit`` command: parses arguments and calls samkit.experiments, nothing more.

    samkit train     --data NAME --model NAME --optimizer NAME [--option NAME=VALUE ...] --epochs N --out DIR
    samkit train     --recipe NAME [any option above, to override the recipe] --out DIR   (--list-recipes)
    samkit compare   [--optimizers sgd,sam,msam --seeds 3 --rho 0.01,0.05 ...]   (no options: the README's job)
    samkit evaluate  RUN [--corruptions]
    samkit sharpness RUN
    samkit landscape RUN

Data-parallel: ``torchrun --nproc_per_node N -m samkit train ...`` (add ``--fsdp`` to shard the model with FSDP2,
docs/fsdp.md). Exit codes: 0 done; 2 bad input (a UsageError: the message names the value and the fix, and nothing
was changed); 130 interrupted (the checkpoint is valid: rerun with --resume); 1 a run that did not end ok, a file
that could not be written (the message says which, and what is safe), or an internal error (with its traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

from samkit.experiments.config import BOTH, TrainConfig
from samkit.experiments.distributed import DEVICES, is_main_process
from samkit.experiments.errors import OutputError, UsageError, checking
from samkit.experiments.methods import options_help
from samkit.experiments.recipes import add_recipe_arguments, build_config, recipe_banner, recipes_epilog
from samkit.experiments.step_log import DEFAULT_EVERY


def _float_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas (e.g. 0.01,0.05), got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {text!r}")
    return values


def _threads(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number of threads >= 1, got {text!r} (omit --threads for torch's choice)"
        )
    return count


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas (e.g. 4,8,16), got {text!r}") from None


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    """``3`` means seeds 0, 1, 2; ``4,7`` means exactly those; ``5,`` means seed 5 alone."""
    try:
        if "," in text:
            return [int(part) for part in text.split(",") if part.strip()]
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (3) or a list of seeds (0,1,2), got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(
            f"the number of seeds must be >= 1, got {count} (a single number is a count; to run seed {count} "
            f"alone, write it as a list: --seeds {count},)"
        )
    return list(range(count))


def _config_flags(command: str, *, shared: bool) -> list[tuple[dataclasses.Field, dict]]:
    """The TrainConfig fields whose flag ``command`` offers (``shared``: the training options both commands have;
    else those of ``train`` alone), with their declarations (``samkit.experiments.config.option``)."""
    found = []
    for field in dataclasses.fields(TrainConfig):
        cli = field.metadata.get("cli")
        if cli is None or command not in cli["commands"] or (cli["commands"] == BOTH) != shared:
            continue
        found.append((field, cli))
    return found


def _flag(field: dataclasses.Field, cli: dict) -> str:
    return cli["flag"] or "--" + field.name.replace("_", "-")


def _help(field: dataclasses.Field, cli: dict) -> Optional[str]:
    """The declared help, plus the TrainConfig default, so --help shows what an omitted option means."""
    if not cli["show_default"]:
        return cli["help"]
    shown = "none" if field.default is None else field.default
    return f"{cli['help']} (default {shown})" if cli["help"] else f"default {shown}"


def _add_config_arguments(parser, command: str, *, shared: bool) -> None:
    """One argparse option per TrainConfig field that ``command`` offers, as the field declares it."""
    for field, cli in _config_flags(command, shared=shared):
        if cli["by_hand"]:
            continue
        kwargs: dict[str, Any] = dict(dest=field.name, help=_help(field, cli))
        if cli["grid"]:
            kwargs["type"] = _float_list
        elif cli["type"] is not None:
            kwargs["type"] = cli["type"]
        for key in ("choices", "metavar"):
            if cli[key] is not None:
                kwargs[key] = cli[key]
        parser.add_argument(_flag(field, cli), **kwargs)


def _add_training_options(parser: argparse.ArgumentParser, command: str) -> None:
    group = parser.add_argument_group(
        "training options (the defaults are `samkit train`'s; `samkit compare` with none of them runs its own job)"
    )
    _add_config_arguments(group, command, shared=True)
    group.add_argument("--device", choices=DEVICES, default="auto", help="default auto: cuda if available")
    group.add_argument(
        "--threads",
        type=_threads,
        help="torch CPU threads (train: torch's choice; compare: 1, since small models gain nothing from more and "
        "oversubscribed cores slow them down many times). It changes the float sums, so config.json records it "
        "and --resume must use the same",
    )
    group.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")


def _option(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE (e.g. k=5), got {text!r}")
    return name.strip().replace("-", "_"), value.strip()


def _method_options(pairs: Optional[list[tuple[str, str]]]) -> Optional[dict[str, str]]:
    if not pairs:
        return None
    options: dict[str, str] = {}
    for name, value in pairs:
        if name in options:
            raise UsageError(f"--option {name} is given twice ({options[name]!r} and {value!r}): give it once")
        options[name] = value
    return options


def _given_fields(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The TrainConfig fields given on ``command``'s line (the grid fields lr and rho: one value each in ``train``,
    left out for ``compare``, which takes them as lists); ``--option`` and ``--recipe`` are read by hand."""
    given = {}
    for shared in (False, True):
        for field, cli in _config_flags(command, shared=shared):
            value = getattr(args, field.name, None)
            if cli["by_hand"] or value is None:
                continue
            if cli["grid"]:
                if command != "train":
                    continue
                value = _single(value, _flag(field, cli))
            given[field.name] = value
    return given


def _single(values: Optional[list[float]], option: str) -> Optional[float]:
    if values is None:
        return None
    if len(values) > 1:
        raise UsageError(f"{option} takes one value in `samkit train`, got {values}; use `samkit compare` for a grid")
    return values[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="samkit", description="Sharpness-aware training: train, compare, measure.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train one model and write DIR/{config,summary}.json, metrics, plots",
        epilog="the methods' own options (--option NAME=VALUE; default shown):\n" + options_help() + "\n\n"
        + recipes_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_arguments(train, "train", shared=False)  # --optimizer, --seed, --init-from, --bootstrap-from
    add_recipe_arguments(train)
    train.add_argument(
        "--option",
        type=_option,
        action="append",
        metavar="NAME=VALUE",
        help="an option of the chosen method, e.g. --optimizer looksam --option k=5 (repeatable; listed below)",
    )
    train.add_argument("--out", required=True, type=Path, metavar="DIR")
    train.add_argument("--resume", action="store_true", help="continue the run in DIR from its checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace the run in DIR")
    train.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 instead of replicating it (DDP); the SAM family's "
        "perturbation then comes from the global batch (docs/fsdp.md)",
    )
    _add_training_options(train, "train")
    diagnostics = train.add_argument_group("SAM step diagnostics (docs/diagnostics.md)")
    diagnostics.add_argument(
        "--step-stats-every",
        type=int,
        default=DEFAULT_EVERY,
        metavar="N",
        help=f"write ||g||, ||eps||, the loss rise and the LR of every N-th step to metrics.jsonl (default "
        f"{DEFAULT_EVERY}; 0: never)",
    )
    diagnostics.add_argument(
        "--step-stats-cosine", action="store_true", help="also record cos(g, g_s) (keeps a copy of the gradient)"
    )
    diagnostics.add_argument(
        "--tensorboard",
        action="store_true",
        help="also write the step and epoch rows to DIR/tensorboard (pip install 'samkit[tensorboard]')",
    )

    compare = commands.add_parser(
        "compare",
        help="a grid of optimizers x seeds (x lr x rho): report.md with CIs",
        description="With no training option: SGD vs SAM vs mSAM on digits with 40%% label noise (mlp, 30 epochs, "
        "batch 64, lr 0.05), the README's job. Any training option starts from `samkit train`'s defaults instead.",
    )
    compare.add_argument("--optimizers", type=_name_list, help="comma-separated (default sgd,sam,msam)")
    compare.add_argument(
        "--micro-batch-sizes",
        type=_int_list,
        metavar="M,M,...",
        help="the m-sharpness sweep: one method msam-m<m> per size m (mSAM with micro-batches of m examples; m = "
        "the batch is SAM), added to --optimizers (default then: sgd)",
    )
    compare.add_argument(
        "--seeds", type=_seeds, default=None, help="a count (3) or a list (0,1,2; one seed: 5,); default 3"
    )
    compare.add_argument("--out", type=Path, default=Path("runs/compare"), metavar="DIR")
    compare.add_argument("--overwrite", action="store_true", help="retrain every run instead of reusing them")
    compare.add_argument(
        "--time-steps",
        type=int,
        default=20,
        metavar="N",
        help="after training, time each method's selected setting side by side in blocks of N steps for the "
        "report's time column (default 20; 0: the runs' own training times)",
    )
    _add_training_options(compare, "compare")

    evaluate = commands.add_parser("evaluate", help="test accuracy of a saved run, clean and under corruptions")
    evaluate.add_argument("run", metavar="RUN")
    evaluate.add_argument(
        "--corruptions",
        nargs="?",
        const="all",
        type=_name_list,
        help="all five (no value) or a comma-separated subset",
    )
    evaluate.add_argument("--severities", type=lambda t: [int(s) for s in _name_list(t)], default=[1, 2, 3, 4, 5])
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", choices=DEVICES, default="cpu")

    for name, text in (("sharpness", "Hessian eigenvalues, trace and m-sharpness"), ("landscape", "2-D loss plot")):
        sub = commands.add_parser(name, help=f"{text} of a saved run's model")
        sub.add_argument("run", metavar="RUN")
        sub.add_argument("--examples", type=int, default=1000, help="training examples to measure on")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--device", choices=DEVICES, default="cpu")
        if name == "sharpness":
            sub.add_argument("--k", type=int, default=5, help="how many top eigenvalues")
            sub.add_argument("--micro-batch-size", type=int, default=128, help="m of the m-sharpness measure")
        else:
            sub.add_argument("--steps", type=int, default=21)
            sub.add_argument("--span", type=float, default=1.0)
    return parser


def _run_train(args: argparse.Namespace) -> int:
    from samkit.experiments.rundir import require_run
    from samkit.experiments.trainer import train

    if args.resume and not args.overwrite:  # (both: the trainer says they contradict each other)
        require_run(args.out)  # never a new run in place of the one the user meant to continue

    given = dict(_given_fields(args, "train"), options=_method_options(args.option))
    with checking():  # an unknown recipe or a bad resolved option is bad input
        config = build_config(args.recipe, given)
    if config.recipe and not args.quiet and is_main_process():
        print(recipe_banner(config))
    summary = train(
        config,
        args.out,
        device=args.device,
        resume=args.resume,
        overwrite=args.overwrite,
        quiet=args.quiet,
        fsdp=args.fsdp,
        step_stats_every=args.step_stats_every,
        step_stats_cosine=args.step_stats_cosine,
        tensorboard=args.tensorboard,
    )
    if not args.quiet and is_main_process():  # under torchrun every rank returns here; rank 0 wrote the files
        print(f"summary: {args.out / 'summary.json'}")
    return 0 if summary["status"] == "ok" else 1


def _run_compare(args: argparse.Namespace) -> int:
    from samkit.experiments.compare import (
        DEFAULT_BASE,
        DEFAULT_OPTIMIZERS,
        DEFAULT_SEEDS,
        compare,
        describe_job,
        micro_batch_sweep,
    )

    given = _given_fields(args, "compare")
    # no training option at all: the README's job; any training option: start from `samkit train`'s defaults,
    # so that nothing of the README job (its 40 % label noise, say) leaks silently into another comparison
    base = TrainConfig(**given) if given or args.lr or args.rho else DEFAULT_BASE
    if base is DEFAULT_BASE:
        print(f"job: the default comparison: {describe_job(base)} (any training option replaces it)", flush=True)
    else:
        print(
            f"job: `samkit train`'s defaults with the options given, not the default comparison's (mlp, 30 epochs, "
            f"40 % label noise): {describe_job(base)}",
            flush=True,
        )
    optimizers = args.optimizers or DEFAULT_OPTIMIZERS
    if args.micro_batch_sizes is not None:
        with checking():  # a size that does not divide the batch is bad input
            optimizers = [*(args.optimizers or ["sgd"]), *micro_batch_sweep(args.micro_batch_sizes)]
    result = compare(
        base,
        args.out,
        optimizers=optimizers,
        seeds=args.seeds or DEFAULT_SEEDS,
        lrs=args.lr,
        rhos=args.rho,
        device=args.device,
        overwrite=args.overwrite,
        quiet=args.quiet,
        time_steps=args.time_steps,
    )
    print()
    print(result.table)
    print()
    print(f"report: {result.report_path}")
    print(f"results: {result.csv_path}")
    for path in result.plot_paths:
        print(f"plot: {path}")
    return 0


def _write_after_printing(write, what: str) -> None:
    """Write a result already printed; a failed write says the result above is all there is."""
    try:
        write()
    except OSError as error:
        raise OutputError(
            f"cannot write {error.filename or what}: {error.strerror or error}; the result printed above was not "
            "saved"
        ) from error


def _run_evaluate(args: argparse.Namespace) -> int:
    from samkit.experiments.evaluate_run import evaluate_run, format_evaluation, write_evaluation

    corruptions = args.corruptions
    if corruptions == ["all"]:
        from samkit.data import CORRUPTIONS

        corruptions = list(CORRUPTIONS)
    result = evaluate_run(
        args.run, corruptions=corruptions, severities=args.severities, seed=args.seed, device=args.device, write=False
    )
    print(format_evaluation(result), flush=True)
    _write_after_printing(lambda: write_evaluation(result), f"{result['run']}/evaluation.json")
    return 0


def _run_sharpness(args: argparse.Namespace) -> int:
    from samkit.experiments.flatness import run_sharpness, write_sharpness

    report = run_sharpness(
        args.run,
        examples=args.examples,
        k=args.k,
        micro_batch_size=args.micro_batch_size,
        seed=args.seed,
        device=args.device,
        write=False,
    )
    for key, value in report.items():
        print(f"{key}: {value}")
    sys.stdout.flush()
    _write_after_printing(lambda: write_sharpness(report), f"{report['run']}/sharpness.json")
    return 0


def _run_landscape(args: argparse.Namespace) -> int:
    from samkit.experiments.flatness import run_landscape

    path = run_landscape(
        args.run, examples=args.examples, steps=args.steps, span=args.span, seed=args.seed, device=args.device
    )
    print(f"landscape: {path}")
    return 0


COMMANDS = {
    "train": _run_train,
    "compare": _run_compare,
    "evaluate": _run_evaluate,
    "sharpness": _run_sharpness,
    "landscape": _run_landscape,
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    threads = getattr(args, "threads", None) or (1 if args.command == "compare" else None)
    if threads:
        import torch

        torch.set_num_threads(threads)
    from samkit.experiments.errors import WRITE_ERRNOS
    from samkit.experiments.trainer import TrainingInterrupted

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"samkit {args.command}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # samkit's warnings as one plain line each, restored on return
            warnings.showwarning = show_warning
            return COMMANDS[args.command](args)
    except TrainingInterrupted as interrupted:
        if args.command == "compare":
            print(
                "samkit compare: interrupted; run the same command again to continue (finished runs are reused)",
                file=sys.stderr,
            )
        else:
            print(f"samkit: {interrupted}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("samkit: interrupted", file=sys.stderr)
        return 130
    except (UsageError, FileNotFoundError) as error:  # bad input, named by the checks; other errors are internal
        print(f"samkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OutputError as error:
        print(f"samkit {args.command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        print(f"samkit {args.command}: error: cannot write {error.filename}: {error.strerror}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
