"""``axolotl ila ...``: the ``axolotl-ila`` commands as a subcommand group of axolotl's CLI.

axolotl (0.19+) finds the group through the ``axolotl.cli_commands`` entry point
(``pyproject.toml``) and imports this module to render ``axolotl --help``, so
it imports click and nothing else of ours: no torch, no axolotl. Each
subcommand hands its arguments, ``--help`` included, to ``axolotl_ila.cli.commands``,
whose one table of commands defines the arguments, help, output and exit
status of both ``axolotl-ila X`` and ``axolotl ila X``.
"""

from __future__ import annotations

import click

PROG = "axolotl ila"
SUMMARY = "Search, show, compare, combine ILA rankings."  # one line of `axolotl --help`
_PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "allow_interspersed_args": False}


def _forwarding_command(name: str, summary: str) -> click.Command:
    def run(args: tuple[str, ...]) -> None:
        from axolotl_ila.cli.commands import main

        click.get_current_context().exit(main([name, *args], prog=PROG))

    return click.Command(
        name,
        callback=run,
        params=[click.Argument(["args"], nargs=-1, type=click.UNPROCESSED)],
        help=summary,
        short_help=summary,
        context_settings=_PASS_THROUGH,
        add_help_option=False,  # --help goes to the command's own parser
    )


class ILACommands(click.Group):
    """The subcommands of ``axolotl_ila.cli.commands.COMMANDS``, looked up when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from axolotl_ila.cli.commands import COMMANDS

        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        from axolotl_ila.cli.commands import COMMANDS

        command = COMMANDS.get(cmd_name)
        return _forwarding_command(cmd_name, command.help) if command is not None else None


ila = ILACommands("ila", help="ILA layer importance for Axolotl: the commands of axolotl-ila.", short_help=SUMMARY)
