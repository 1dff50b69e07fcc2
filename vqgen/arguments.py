"""Command-line options generated from the config dataclasses, shared by scripts and the CLI.

Every option defaults to None so that "given on the command line" can be told apart from
"the config's default": on --resume only the given ones are compared with the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Callable, NoReturn

from vqgen.core.console import print_error
from vqgen.core.errors import VQGenError

HELP = {
    # data
    "source": "built-in dataset ('builtin'), a folder of images, a parquet/arrow folder or file, "
              "a save_to_disk folder, or a hub name",
    "image_column": "image column of a datasets source (found automatically)",
    "label_column": "label column of a datasets source (found automatically; 'none' ignores labels)",
    "image_size": "bring every image to this square size",
    "resize_mode": "how --image-size is reached: resize | center-crop | pad",
    "test_fraction": "fraction held out as test split when the source has none",
    "max_images": "use at most this many images per split",
    "seed": "random seed (training: initialisation and data order; --data-seed: built-in data and hold-out)",
    # training
    "batch_size": "batch size per process",
    "learning_rate": "peak learning rate (--lr)",
    "max_steps": "optimizer steps to train (0: use --epochs)",
    "grad_accum_steps": "micro-batches per optimizer step",
    "mixed_precision": "no | fp16 | bf16",
    "eval_every": "evaluate on the test split every N steps (0: at the end)",
    "save_every": "save weights and resumable state every N steps (0: at the end)",
    "keep": "number of resumable states to keep",
    "report_to": "none | tensorboard | wandb (must be installed)",
    # vq-vae
    "codebook_size": "number of codes K",
    "code_dim": "dimension d of a code vector",
    "downsample": "image size / code grid size (power of two)",
    "beta": "commitment weight (on ||z_e - sg[e]||^2)",
    "codebook_update": "loss (codebook term) | ema (moving averages)",
    "restart_after": "restart codes unused for this many steps (0: never)",
    "kmeans_init": "initialise the codebook by k-means on the first batch",
}
ALIASES = {"learning_rate": ["--lr"], "source": ["--data"]}
# fields whose option name would clash with another config's: (config class, field) -> option dest
RENAMES = {("DataConfig", "seed"): "data_seed"}


def _dest(cls: type, name: str) -> str:
    return RENAMES.get((cls.__name__, name), name)


def exit_code(command: Callable[[], object]) -> int:
    """Run a command: 0 when it succeeds; a user's mistake is one line on stderr and exit code 2."""
    try:
        command()
    except VQGenError as err:
        print_error(str(err))
        return 2
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    return 0


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the bad value, like every other error."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: {message} (see --help)")
        sys.exit(2)


def _base_type(tp: Any) -> Any:
    """int | None -> int; tuple[...] -> str (not exposed)."""
    if isinstance(tp, (types.UnionType,)) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def add_config_options(parser: argparse.ArgumentParser | Any, cls: type, skip: tuple[str, ...] = (),
                       title: str | None = None, defaults: dict[str, Any] | None = None) -> None:
    """Add `--field-name` for every field of the dataclass `cls` (defaults None, shown in help).

    `defaults`: what the command uses instead of the dataclass default, for the help text.
    """
    group = parser.add_argument_group(title or cls.__name__)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        dest = _dest(cls, f.name)
        names = ALIASES.get(f.name, []) + [f"--{dest.replace('_', '-')}"]
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        help_text = f"{HELP.get(f.name, f.name.replace('_', ' '))} (default: {default})"
        if tp is bool:
            group.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif tp in (int, float, str):
            group.add_argument(*names, dest=dest, type=tp, default=None, metavar=tp.__name__.upper(), help=help_text)


def given_options(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    return {f.name: getattr(args, _dest(cls, f.name)) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, _dest(cls, f.name), None) is not None}

