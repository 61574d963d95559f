"""LightningCLI with TierCacheCallback always present, its arguments under ``--tiercache.<argument>``.

:class:`TierCacheCLI` adds the callback with LightningCLI's convention for a callback every run has
(``parser.add_lightning_class_args(TierCacheCallback, "tiercache")``): a ``tiercache:`` section in the YAML
config, one ``--tiercache.<argument>`` flag per argument, all listed by ``--help`` with their choices. A bad
value ends the program before anything runs with one line naming the argument, the value and what is allowed,
and exit code 2 (argparse's code for a usage error), instead of a chained traceback from inside the
instantiation. Needs ``jsonargparse[signatures]`` (Lightning's ``pytorch-extra``).

Example::

    from lightning_tiercache.lightning.cli import TierCacheCLI

    TierCacheCLI(MyModule, MyDataModule)   # python train.py fit --config c.yaml --tiercache.host_bytes 16GiB
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_tiercache.lightning.callback import TierCacheCallback

__all__ = ["GROUP", "OneLineErrorParser", "TierCacheCLI", "usage_error"]

#: The config section and flag prefix of the callback's arguments.
GROUP = "tiercache"


def usage_error(message: str, prog: str | None = None) -> NoReturn:
    """Print ``prog: error: message`` to stderr and exit with status 2, as argparse does for a bad argument."""
    sys.stderr.write(f"{prog or sys.argv[0]}: error: {message}\n")
    raise SystemExit(2)


class OneLineErrorParser(LightningArgumentParser):
    """A ``LightningArgumentParser`` whose errors are one line (no usage block) and exit with status 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        usage_error(_plain(message) + f" (all arguments: {self.prog} --help)", prog=self.prog)
        raise AssertionError("unreachable")  # usage_error exits


def _plain(message: str) -> str:
    """jsonargparse's multi-line message as one line; a choice error says the value and the choices."""
    text = " ".join(message.split())
    m = re.fullmatch(r'Parser key "([\w.]+)": Expected a typing\.Literal\[(.*)\]\. Got value: (.*)', text)
    if m is not None:
        choices = ", ".join(c.strip().strip("'\"") for c in m.group(2).split(","))
        return f"--{m.group(1)}={m.group(3)!r} is not one of {choices}"
    return text


class TierCacheCLI(LightningCLI):
    """A ``LightningCLI`` whose trainer always has one :class:`TierCacheCallback` built from ``--tiercache.*``.

    Arguments are those of ``LightningCLI`` (``parser_class`` defaults to :class:`OneLineErrorParser`).
    Subclasses that override :meth:`add_arguments_to_parser` call ``super().add_arguments_to_parser(parser)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", OneLineErrorParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(TierCacheCallback, GROUP)

    def before_instantiate_classes(self) -> None:
        """Build the callback once from its section, so a bad value stops here with a one-line message."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        section = config.get(GROUP)
        args: dict[str, Any] = dict(section) if isinstance(section, dict) else dict(vars(section or {}))
        try:
            TierCacheCallback(**args)
        except (ValueError, TypeError) as err:
            usage_error(_flag_message(str(err)), prog=self.parser.prog)


def _flag_message(text: str) -> str:
    """``kv_quant='int3' is not ...`` -> ``--tiercache.kv_quant='int3' is not ...`` (the flag that sets it)."""
    m = re.match(r"(\w+)", text)
    if m is not None and m.group(1) in _ARGUMENTS:
        return f"--{GROUP}.{text}"
    return f"--{GROUP}: {text}"


_ARGUMENTS = frozenset(inspect.signature(TierCacheCallback.__init__).parameters) - {"self"}
