"""The ``mpexport`` command line: parses options, calls the library, prints tables or JSON.

Exit codes: 0 success, 1 a parity check failed, 2 bad usage or bad input (one line, no traceback).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mpexport.errors import MpexportError, first_line

stdout = Console(highlight=False)
stderr = Console(stderr=True, highlight=False)
EXIT_PARITY_FAILED = 1


class MpexportGroup(click.Group):
    """Turns :class:`MpexportError` and unexpected failures into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MpexportError as exc:
            _fail(exc.one_line(), exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # last resort: one line instead of a traceback
            if os.environ.get("MPEXPORT_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {first_line(exc)} (set MPEXPORT_DEBUG=1 for the traceback)", 2)


def _fail(message: str, code: int) -> None:
    stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    sys.exit(code)


@click.group(cls=MpexportGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mpexport")
def main() -> None:
    """Deploy a model trained with mixed precision (torch.autocast + GradScaler) without losing the
    precision it was trained with.

    \b
    Example:
      mpexport convert models/digits_resnet.pt2 --val-data models/digits_resnet.val.npz --out build/resnet
    """


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output directory (written atomically; must not exist unless --force).")
@click.option("--val-data", type=click.Path(path_type=str),
              help="Validation data: .npz with arrays named after the inputs (+ optional 'labels'), or a "
              "directory of .npz shards.")
@click.option("--input", "input_options", multiple=True, metavar="NAME:SHAPE:DTYPE",
              help="An input's shape and dtype, e.g. pixels:batch,3,224,224:float32 (named dims are dynamic; "
              "seq=128 gives an example size). Repeat for several inputs.")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="For a checkpoint (state dict): the function that builds the nn.Module, e.g. mypkg.models:build.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow loading a fully pickled nn.Module (runs code from the file: only for files you trust).")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension instead of keeping it dynamic.")
@click.option("--opset", type=click.IntRange(13, 30), help="ONNX opset (default: the exporter's).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
def convert(model: str, out: str, val_data: str | None, input_options: tuple[str, ...], factory: str | None,
            trust_pickle: bool, static_batch: bool, opset: int | None, force: bool, as_json: bool) -> None:
    """Export MODEL to an FP32 ONNX that records where every node came from, and check it against PyTorch.

    MODEL is a torch.export archive (.pt2, recommended), a TorchScript file, a checkpoint with
    --factory, or a pickled module with --trust-pickle; the format is read from the file's content.
    Exit code 1 means ONNX Runtime did not reproduce the PyTorch FP32 outputs.

    \b
    Examples:
      mpexport convert models/digits_resnet.pt2 --val-data models/digits_resnet.val.npz --out build/resnet
      mpexport convert ckpt.pt --factory mypkg.models:build --input pixels:batch,3,224,224:float32 --out build/m
    """
    from mpexport.convert import convert as run_convert
    from mpexport.specs import parse_input_option

    specs = [parse_input_option(text) for text in input_options]
    with _progress(as_json) as on_stage:
        result = run_convert(
            model, out=out, val_data=val_data, inputs=specs, factory=factory, trust_pickle=trust_pickle,
            force=force, dynamic_batch=not static_batch, opset=opset, on_stage=on_stage,
        )
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "notes": result.notes, "manifest": result.manifest},
                              indent=2, sort_keys=True))
    else:
        _print_convert(result)
    if not result.export_check_passed:
        sys.exit(EXIT_PARITY_FAILED)


class _progress:
    """A spinner on stderr naming the running stage (silent with --json or when stderr is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not stderr.is_terminal
        self.status = None

    def __enter__(self) -> Callable[[str], None]:
        if self.quiet:
            return lambda _name: None
        self.status = stderr.status("starting")
        self.status.__enter__()
        return lambda name: self.status.update(f"[bold]{name}[/] …")

    def __exit__(self, *exc_info: object) -> None:
        if self.status is not None:
            self.status.__exit__(*exc_info)


def _print_convert(result: Any) -> None:
    manifest = result.manifest
    table = Table(title=f"mpexport convert → {result.out}", show_header=True, title_justify="left")
    table.add_column("stage")
    table.add_column("result")
    source = manifest["source"]
    table.add_row("load", f"{source['format']}  {source['path']}")
    export = manifest["export"]
    table.add_row("export", f"{export['strategy']} in {export['seconds']} s, opset {export['opset']}"
                  + (", external data" if export["external_data"] else ""))
    prov = manifest["provenance"]
    table.add_row("provenance", f"{prov['attributed']}/{prov['nodes']} nodes with module + aten op "
                  f"({prov['coverage']:.1%})")
    check = manifest["export_check"]
    worst = max(check["outputs"].values(), key=lambda output: output["relative_error"])
    verdict = "[green]pass[/]" if check["passed"] else "[red]FAIL[/]"
    table.add_row("export check", f"{verdict}  ONNX Runtime vs PyTorch FP32 on {check['samples']} samples, "
                  f"max error {worst['relative_error']:.1e} of output scale (tolerance {check['rtol']:g})")
    for key, name in manifest["artifacts"].items():
        table.add_row(f"artifact {key}", name)
    stdout.print(table)
    io = Table(show_header=True, title="inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for spec in manifest[kind]:
            io.add_row(kind[:-1], spec["name"], spec["dtype"], "(" + ", ".join(map(str, spec["shape"])) + ")")
    stdout.print(io)
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)


if __name__ == "__main__":
    main()
