"""``python -m fusedist.launch``: the launch and doctor commands on their own."""

import typer

from fusedist.launch.commands import register

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
register(app)

if __name__ == "__main__":
    app(prog_name="fusedist")
