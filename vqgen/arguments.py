"""Command-line options generated from the config dataclasses, shared by the scripts and the CLI.

Each field carries its help (and choices, flag name, aliases) as metadata (`vqgen.core.store.configs.option`);
this module maps fields to `--flags`. Every option defaults to None so that "given on the command
line" can be told apart from "the config's default": on --resume only the given ones are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import signal
import sys
import types
import typing
from typing import Any, Callable, NoReturn

from stage1_vqvae.config import PRESETS, GANConfig, VQVAEConfig
from stage1_vqvae.config import TRAIN_DEFAULTS as VQVAE_TRAIN_DEFAULTS
from stage2_prior.config import ADOPT_CANDIDATES, PRIOR_CONFIGS, PriorConfig
from stage2_prior.config import TRAIN_DEFAULTS as PRIOR_TRAIN_DEFAULTS
from vqgen.core.data.config import DataConfig
from vqgen.core.runtime.console import print_error
from vqgen.core.runtime.errors import TrainingStopped, VQGenError
from vqgen.core.training.config import TrainConfig


def flag(f: dataclasses.Field) -> str:
    """The option name of a config field, without dashes: `learning_rate` -> `learning-rate`."""
    return f.metadata.get("flag") or f.name.replace("_", "-")


def _dest(f: dataclasses.Field) -> str:
    return flag(f).replace("-", "_")


def exit_code(command: Callable[[], object]) -> int:
    """Run a command: 0 when it succeeds; a user's mistake is one line on stderr and exit code 2; a
    training stopped by a signal says how to resume it and exits 128 + the signal's number."""
    try:
        command()
    except VQGenError as err:
        print_error(str(err))
        return 2
    except TrainingStopped as stop:
        if stop.main_process:
            print_error(f"{stop}; resume with: {resume_command(sys.argv)}", label="stopped")
        return stop.exit_code
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM turned into an interrupt (`Terminated`)
        print_error("interrupted: nothing half-written was kept", label="stopped")
        return 128 + getattr(err, "signum", signal.SIGINT)
    finally:
        _end_process_group()
    return 0


def _end_process_group() -> None:
    """Shut down the process group of a multi-process run (gloo, NCCL) before the interpreter exits: left
    running, its threads can abort the process at exit ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")  # imported only if the command used it: --help stays light
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:  # every process past its last collective before any tears its connections down
            if dist.get_backend() == "gloo":  # bounded: a process that failed alone must not hang the others
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
            else:
                dist.barrier()
        except Exception:  # noqa: BLE001 - exiting anyway; the command's own outcome is what counts
            pass
        finally:
            dist.destroy_process_group()


def resume_command(argv: list[str]) -> str:
    """The command line that continues this training: the same options, `--resume`, never `--overwrite`.

    `argv` is `sys.argv`: of a script (`scripts/train_vqvae.py ...`), of the `vqgen` console script, or of
    `python -m vqgen` (whose argv[0] is vqgen/__main__.py)."""
    options = [a for a in argv[1:] if a != "--overwrite"]
    if "--resume" not in options:
        options.append("--resume")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    program = os.path.basename(argv[0])
    if program in ("vqgen", "__main__.py"):
        launcher = ["accelerate", "launch", "--num_processes", str(processes), "-m"] if processes > 1 else []
        return shlex.join([*launcher, "vqgen", *options] if launcher else ["vqgen", *options])
    launcher = ["accelerate", "launch", "--num_processes", str(processes)] if processes > 1 else ["python"]
    return shlex.join([*launcher, argv[0], *options])


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line naming the bad value, like every other error."""

    def error(self, message: str) -> NoReturn:
        print_error(f"{self.prog}: {message} (see --help)")
        sys.exit(2)


def _base_type(tp: Any) -> Any:
    """int | None -> int; tuple[int, ...] and tuple[float, ...] stay (comma lists); other tuples are not exposed."""
    if isinstance(tp, (types.UnionType,)) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def comma_list(item: type) -> Callable[[str], tuple]:
    """The argparse type of a `tuple[item, ...]` field: "1,2,2,4" -> (1, 2, 2, 4); "" -> ()."""

    def parse(text: str) -> tuple:
        try:
            return tuple(item(part) for part in text.split(",")) if text.strip() else ()
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {item.__name__}s like 1,2,2,4, got {text!r}") from None

    parse.__name__ = f"comma list of {item.__name__}s"  # argparse names the type in its errors
    return parse


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
        names = list(f.metadata.get("aliases", ())) + [f"--{flag(f)}"]
        default = f.default if f.default is not dataclasses.MISSING else None
        default = (defaults or {}).get(f.name, default)
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) or "empty"
        choices = f.metadata.get("choices")
        help_text = f.metadata.get("help") or f.name.replace("_", " ")
        help_text += f" ({' | '.join(choices)}; default: {default})" if choices else f" (default: {default})"
        if tp is bool:
            group.add_argument(*names, dest=_dest(f), action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        elif tp in (int, float, str):
            group.add_argument(*names, dest=_dest(f), type=tp, default=None, choices=choices,
                               metavar=tp.__name__.upper(), help=help_text)
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,) \
                and typing.get_args(tp)[0] in (int, float):
            item = typing.get_args(tp)[0]
            group.add_argument(*names, dest=_dest(f), type=comma_list(item), default=None,
                               metavar=f"{item.__name__.upper()},...", help=help_text)


def given_options(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` that were given on the command line."""
    return {f.name: getattr(args, _dest(f)) for f in dataclasses.fields(cls)
            if f.name not in skip and getattr(args, _dest(f), None) is not None}


# training options a fresh run sizes from its data (docs/defaults.md), shown so in --help
SIZED_TRAINING = {name: "sized to the data" for name in ("max_steps", "eval_every", "save_every")}
VQVAE_FROM_DATA = ("in_channels", "image_height", "image_width")  # model fields the data sets
PRIOR_ONLY_TRAINING = ("weight_average",)  # training options stage 1 does not take (its quantizer's statistics)
PRIOR_FROM_CODES = ("codebook_size", "grid_height", "grid_width", "num_classes")  # prior fields the codes set


def add_vqvae_training_options(parser: argparse.ArgumentParser) -> None:
    """`vqgen train vqvae` (and scripts/train_vqvae.py): the run, resume/overwrite, then the data, training and
    model options of stage 1's configs."""
    _add_run_options(parser, "VQ-VAE")
    parser.add_argument("--no-encode", action="store_true", help="skip dumping the code grids at the end")
    parser.add_argument("--preset", choices=tuple(PRESETS),
                        help=f"model options for an image side ({' | '.join(PRESETS)}), filling only the model "
                             "options not given (default: none, the sized defaults)")
    add_config_options(parser, DataConfig, title="data")
    add_config_options(parser, TrainConfig, skip=PRIOR_ONLY_TRAINING, title="training",
                       defaults={**VQVAE_TRAIN_DEFAULTS, **SIZED_TRAINING})
    add_config_options(parser, VQVAEConfig, skip=VQVAE_FROM_DATA, title="model")
    add_config_options(parser, GANConfig, title="adversarial and perceptual terms (off by default)")


def add_prior_training_options(parser: argparse.ArgumentParser) -> None:
    """`vqgen train prior` (and scripts/train_prior.py): the run, the prior kind, labels, resume/overwrite, then
    the training options and every prior kind's model options."""
    _add_run_options(parser, "prior")
    parser.add_argument("--prior", default=None, choices=sorted(PRIOR_CONFIGS),
                        help=f"which prior ({' | '.join(sorted(PRIOR_CONFIGS))}; default: transformer, "
                             "or the saved prior's kind on --resume)")
    parser.add_argument("--codes", default=None, help="codes folder (default: RUN/codes)")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--conditional", dest="labels", action="store_const", const="yes",
                        help="condition on labels (error if the codes have none)")
    labels.add_argument("--unconditional", dest="labels", action="store_const", const="no",
                        help="ignore the codes' labels")
    parser.set_defaults(labels="auto")
    parser.add_argument("--allow-vqvae-mismatch", action="store_true",
                        help="train even if the codes came from another VQ-VAE than the run's")
    parser.add_argument("--no-adopt", action="store_true",
                        help="a conditional prior of under 500k training codes, with 200 test images or more, in "
                             f"one process: skip scoring {len(ADOPT_CANDIDATES)} guidances after training (`vqgen "
                             "eval --samples 1000 --seeds 2 --adopt`, a few minutes) and sample at the default")
    add_config_options(parser, TrainConfig, title="training", defaults={**PRIOR_TRAIN_DEFAULTS, **SIZED_TRAINING})
    add_config_options(parser, PriorConfig, skip=PRIOR_FROM_CODES, title="every prior",
                       defaults={"dropout": "sized to the codes and the planned passes",
                                 "code_dropout": "0.1 under 500k training codes, else 0"})
    seen = {f.name for f in dataclasses.fields(PriorConfig)}
    for name, config in PRIOR_CONFIGS.items():
        new = {f.name for f in dataclasses.fields(config)} - seen
        if not new:
            continue  # a kind whose options another kind's group already holds (the masked prior's)
        sharing = [other for other, c in PRIOR_CONFIGS.items() if new <= {f.name for f in dataclasses.fields(c)}]
        add_config_options(parser, config, skip=tuple(seen), title=f"{' and '.join(sharing)} prior")
        seen |= new


def _add_run_options(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--run", default="runs/default", help="run directory (default: runs/default)")
    parser.add_argument("--resume", action="store_true", help=f"continue the {what} from the run's last saved state")
    parser.add_argument("--overwrite", action="store_true", help=f"replace the run's trained {what}")


def given_prior_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model options of every prior kind given on the command line (the entry point refuses those that do
    not apply to the chosen kind)."""
    given: dict[str, Any] = {}
    for config in PRIOR_CONFIGS.values():
        given.update(given_options(args, config, skip=PRIOR_FROM_CODES))
    return given
