"""The ``mpexport`` command line: parses options, calls the library, prints tables or JSON.

Exit codes: 0 success, 1 a parity check failed, 2 bad usage or bad input (one line, no traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from mpexport.cli.render import (
    BatchProgress,
    StageProgress,
    print_convert,
    print_inspect,
    print_notes,
    print_repair,
    print_verify,
    stderr,
    stdout,
)

# Before torch is imported: OpenMP threads that spin after each PyTorch op starve ONNX Runtime's sessions on a few
# cores, and the other way round (a one-sample verify step measured 48-198 ms instead of 1.8 ms on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from mpexport.base.errors import MpexportError, first_line
from mpexport.base.policies import POLICY_NAMES
from mpexport.check.report import VerifyOptions
from mpexport.cli.options import gate_options, ray_options
from mpexport.commands.package import FORMATS
from mpexport.minimize import DEFAULT_MAX_TRIALS
from mpexport.sources.hf import TASKS as HF_TASKS

EXIT_PARITY_FAILED = 1


class MpexportGroup(click.Group):
    """Turns :class:`MpexportError` and unexpected failures into one line on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        _terminate_cleanly()
        if not os.environ.get("MPEXPORT_DEBUG"):
            warnings.simplefilter("ignore")  # libraries' warnings: mpexport reports what matters, in one line
        try:
            return super().invoke(ctx)
        except MpexportError as exc:
            _fail(exc.one_line(), exc.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except _Terminated:
            _fail("terminated", 143)
        except RecursionError:
            _fail("an input is nested too deeply to read (Python's recursion limit): it is not a file mpexport "
                  "writes or reads", 2)
        except MemoryError:
            _fail("out of memory: an input is larger than this machine can hold (check the file sizes, or lower "
                  "--batch-size)", 2)
        except Exception as exc:  # last resort: one line instead of a traceback
            if os.environ.get("MPEXPORT_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {first_line(exc)} (set MPEXPORT_DEBUG=1 for the traceback)", 2)


class _Terminated(BaseException):
    """SIGTERM, raised where the program is, so that cleanups (staging and temporary directories) run."""


def _terminate_cleanly() -> None:
    def handler(_signum: int, _frame: object) -> None:
        raise _Terminated

    with contextlib.suppress(ValueError):  # not the main thread: leave the default
        signal.signal(signal.SIGTERM, handler)


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
@click.argument("model", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Output directory (written atomically; must not exist unless --force).")
@click.option("--val-data", type=click.Path(path_type=str),
              help="Validation data: .npz with arrays named after the inputs (+ optional 'labels'), a "
              "directory of .npz shards, Parquet/Arrow files (or a directory of them), a datasets directory "
              "(save_to_disk), or module:function returning batches (e.g. a DataLoader).")
@click.option("--columns", "columns", multiple=True, metavar="INPUT=COLUMN,...",
              help="For Parquet/Arrow data: the column of each input (and labels), e.g. pixels=image,labels=label.")
@click.option("--input", "input_options", multiple=True, metavar="NAME:SHAPE:DTYPE",
              help="An input's shape and dtype, e.g. pixels:batch,3,224,224:float32 (named dims are dynamic; "
              "seq=128 gives an example size). Repeat for several inputs.")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="For a checkpoint (state dict): the function that builds the nn.Module, e.g. mypkg.models:build.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow what runs code from the model file: a fully pickled nn.Module, pickled weights or "
              "constants in a .pt2 (only for files you trust).")
@click.option("--task", type=click.Choice(sorted(HF_TASKS)),
              help="For a Hugging Face model directory: the head to build (default: the config's architecture).")
@click.option("--static-batch", is_flag=True, help="Fix the batch dimension instead of keeping it dynamic.")
@click.option("--opset", type=click.IntRange(13, 30), help="ONNX opset (default: the exporter's).")
@click.option("--amp-policy", type=click.Choice(POLICY_NAMES),
              help="The autocast policy the model was trained with (default: what the model file records, "
              "else cuda-fp16).")
@click.option("--target", type=click.Choice(["fp16", "bf16"]),
              help="Low-precision type of the deployed model (default: the training policy's).")
@click.option("--policy", "policy_file", type=click.Path(dir_okay=False, path_type=str), metavar="FILE.toml",
              help="Overrides: [keep_fp32] / [force_low] tables with modules (regexes), ops, nodes lists; "
              "optional policy, target, range_check, headroom.")
@click.option("--keep-fp32-module", multiple=True, metavar="REGEX", help="Keep modules matching REGEX in FP32.")
@click.option("--keep-fp32-op", multiple=True, metavar="OP",
              help="Keep an op type (Softmax) or aten op (aten.gelu) in FP32.")
@click.option("--force-low-module", multiple=True, metavar="REGEX", help="Run modules matching REGEX in low precision.")
@click.option("--force-low-op", multiple=True, metavar="OP", help="Run an op type or aten op in low precision.")
@click.option("--no-range-check", is_flag=True, help="Do not keep nodes FP32 for values beyond the target's range.")
@click.option("--no-training-ranges", is_flag=True,
              help="Do not use the range evidence recorded in training (mpexport.RangeMonitor).")
@click.option("--calibration-samples", type=click.IntRange(0), default=256, show_default=True,
              help="Validation samples the range rule looks at.")
@click.option("--check-samples", type=click.IntRange(1), default=256, show_default=True,
              help="Validation samples the FP32 export is checked on against PyTorch (the same pass as the range "
              "rule's; verify covers the whole set).")
@click.option("--io-types", type=click.Choice(["fp32", "native"]), default="fp32", show_default=True,
              help="Types of the mixed model's inputs and outputs: FP32 as trained, or the type their "
              "nodes compute in.")
@click.option("--engine", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="TensorRT engine: build where TensorRT and a GPU exist (auto), require one (on), or skip (off).")
@click.option("--shapes", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="Engine optimization profile for an input, e.g. pixels:1x1x8x8,32x1x8x8,64x1x8x8 "
              "(default: from the validation batches).")
@click.option("--allow-tf32", is_flag=True, help="Let the engine's FP32 layers use TF32 (off: FP32 means FP32).")
@click.option("--force", is_flag=True, help="Replace an existing output directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON instead of tables.")
def convert(model: str, out: str, val_data: str | None, columns: tuple[str, ...], input_options: tuple[str, ...],
            factory: str | None, trust_pickle: bool, task: str | None, static_batch: bool, opset: int | None,
            amp_policy: str | None, target: str | None, policy_file: str | None, keep_fp32_module: tuple[str, ...],
            keep_fp32_op: tuple[str, ...],
            force_low_module: tuple[str, ...], force_low_op: tuple[str, ...], no_range_check: bool,
            no_training_ranges: bool, calibration_samples: int, check_samples: int, io_types: str, engine: str,
            shapes: tuple[str, ...], allow_tf32: bool, force: bool, as_json: bool) -> None:
    """Export MODEL to an FP32 ONNX that records where every node came from, and check it against PyTorch.

    MODEL is a torch.export archive (.pt2, recommended: write it with mpexport.save), a Hugging Face
    model directory (config.json + weights, e.g. a Trainer's output), an FP32 ONNX, a TorchScript
    file, a checkpoint with --factory (timm and Lightning checkpoints included), or a pickled module
    with --trust-pickle; the format is read from the content. The training precision is read from
    the framework's record (training_args.bin, timm's args, Lightning's precision state, mpexport.save's
    record) without running code from it; --amp-policy overrides it, and the override is noted.
    It then plans each node's precision after the training autocast policy and writes the
    mixed-precision ONNX (model.mixed.onnx), linted. Exit code 1 means ONNX Runtime did not reproduce
    the PyTorch FP32 outputs or the mixed model failed lint (the directory is written for inspection).

    \b
    Examples:
      mpexport convert models/digits_resnet.pt2 --val-data models/digits_resnet.val.npz --out build/resnet
      mpexport convert ckpt.pt --factory mypkg.models:build --input pixels:batch,3,224,224:float32 --out build/m
      mpexport convert trainer_out/ --val-data val.npz --out build/bert
    """
    from mpexport.base.specs import parse_input_option
    from mpexport.commands.convert import EngineOptions
    from mpexport.commands.convert import convert as run_convert
    from mpexport.data.open import parse_columns_option
    from mpexport.deploy.tensorrt import parse_shapes_option
    from mpexport.precision.options import Overrides, PlanOptions

    specs = [parse_input_option(text) for text in input_options]
    overrides = Overrides(keep_fp32_modules=list(keep_fp32_module), keep_fp32_ops=list(keep_fp32_op),
                          force_low_modules=list(force_low_module), force_low_ops=list(force_low_op))
    options = PlanOptions(policy=amp_policy or "", target=target, range_check=not no_range_check, overrides=overrides,
                          training_ranges=not no_training_ranges)
    with StageProgress(as_json) as progress:
        result = run_convert(
            model, out=out, val_data=val_data, inputs=specs, factory=factory, trust_pickle=trust_pickle, task=task,
            columns=parse_columns_option(columns),
            force=force, dynamic_batch=not static_batch, opset=opset, plan_options=options, policy_file=policy_file,
            calibration_samples=calibration_samples, check_samples=check_samples, io_types=io_types, engine=engine,
            engine_options=EngineOptions(shapes=parse_shapes_option(shapes), allow_tf32=allow_tf32),
            on_stage=progress.stage, on_progress=progress.advance,
        )
    if as_json:
        click.echo(json.dumps({"out": str(result.out), "notes": result.notes, "manifest": result.manifest.to_json()},
                              indent=2, sort_keys=True))
    else:
        print_convert(result)
    if not result.export_check_passed or not result.lint_passed:
        sys.exit(EXIT_PARITY_FAILED)


@main.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=str))
@gate_options
@click.option("--reference", type=click.Path(dir_okay=False, path_type=str),
              help="The FP32 model to compare with: --candidate's reference (a PyTorch model, or the FP32 ONNX the "
              "candidate was converted from), or with DIRECTORY (a model converted from ONNX) the PyTorch model.")
@click.option("--candidate", type=click.Path(dir_okay=False, path_type=str),
              help="Without DIRECTORY: any ONNX file (e.g. made by another tool) to check.")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="Builds a checkpoint's model: the source model's (convert's --factory; a manifest never names code "
              "that runs), or the --reference's.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow what runs code from the model file: a pickled module, pickled payloads in a .pt2.")
@click.option("--amp-policy", type=click.Choice(POLICY_NAMES), default="cuda-fp16", show_default=True,
              help="With --reference: the training policy (the noise floor of the budget).")
@click.option("--low", type=click.Choice(["fp16", "bf16"]), default="fp16", show_default=True,
              help="With --candidate: the low type its strict emulation is named after.")
@click.option("--repair", "then_repair", is_flag=True,
              help="With DIRECTORY: when verify fails, run mpexport repair on it (same options).")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", metavar="[ADDRESS]",
              help="Run the batches on a Ray cluster (ADDRESS, e.g. ray://head:10001; alone: a local Ray instance or "
              "RAY_ADDRESS) for the same report. Needs mpexport[ray]; workers read the same paths.")
@click.option("--workers", type=click.IntRange(1), help="With --ray: actors (default: the cluster's CPUs / "
              "--cpus-per-worker).")
@click.option("--cpus-per-worker", type=click.IntRange(1), default=1, show_default=True,
              help="With --ray: CPUs (threads) per actor.")
@click.option("--gpus-per-worker", type=click.FloatRange(0), help="With --ray: GPUs per actor (default: an equal "
              "share of the cluster's, at most 1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(directory: str | None, val_data: str | None, options: VerifyOptions, reference: str | None,
           candidate: str | None, factory: str | None, trust_pickle: bool, amp_policy: str, low: str,
           then_repair: bool, ray_address: str | None, workers: int | None, cpus_per_worker: int,
           gpus_per_worker: float | None, as_json: bool) -> None:
    """Run the FP32 baseline and every deployable form side by side on the validation set, and gate.

    Backends: torch-fp32 (reference), torch-amp (the training policy: the noise floor), onnx-fp32,
    onnx-mixed, and strict-fp16/bf16 (true low-precision storage, which ONNX Runtime's CPU kernels
    would otherwise hide). Writes report.json and report.html into DIRECTORY. Exit 0 pass, 1 fail,
    2 bad input.

    \b
    Examples:
      mpexport verify build/resnet
      mpexport verify build/resnet --repair
      mpexport verify build/bert --val-data val/ --ray              # a local Ray instance
      mpexport verify build/bert --val-data /shared/val --ray ray://head:10001 --cpus-per-worker 4
      mpexport verify --reference model.pt2 --candidate other_tool.onnx --val-data val.npz
    """
    from mpexport.check.verify import verify_candidate
    from mpexport.commands.verify import verify as run_verify

    if then_repair and not directory:
        raise click.UsageError("--repair needs DIRECTORY")
    ray = ray_options(ray_address, workers, cpus_per_worker, gpus_per_worker, directory)
    with BatchProgress(as_json, "verifying on Ray (shards)" if ray else "verifying") as on_progress:
        if directory:
            if candidate:
                raise click.UsageError("give DIRECTORY, or --reference and --candidate, not both")
            report = run_verify(directory, val_data=val_data, options=options, trust_pickle=trust_pickle,
                                factory=factory, on_batch=on_progress, reference=reference, ray=ray,
                                on_shard=on_progress)
        else:
            if not (reference and candidate and val_data):
                raise click.UsageError("without DIRECTORY, give --reference, --candidate and --val-data")
            report = verify_candidate(reference, candidate, val_data, factory=factory, trust_pickle=trust_pickle,
                                      policy=amp_policy, low=low, options=options, on_batch=on_progress)
    if as_json and not (then_repair and not report.passed):
        click.echo(json.dumps(report.to_json(), indent=2))
    elif not as_json:
        print_verify(report, directory)
    if not report.passed and then_repair and directory:
        _run_repair(directory, val_data, trust_pickle, factory, options, DEFAULT_MAX_TRIALS, as_json)
        return
    if not report.passed:
        sys.exit(EXIT_PARITY_FAILED)



@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@gate_options
@click.option("--trust-pickle", is_flag=True,
              help="Allow what runs code from the model file: a pickled module, pickled payloads in a .pt2.")
@click.option("--factory", metavar="MODULE:FUNCTION",
              help="Builds the checkpoint's model, as convert's --factory did (a manifest never names code that runs).")
@click.option("--max-trials", type=click.IntRange(1), default=DEFAULT_MAX_TRIALS, show_default=True,
              help="Stop searching after this many trials.")
@click.option("--allow-costly", is_flag=True,
              help="Commit a repair even when it moves most of the low-precision work to FP32.")
@click.option("--json", "as_json", is_flag=True, help="Print repair.json instead of tables.")
def repair(directory: str, val_data: str | None, options: VerifyOptions, trust_pickle: bool, factory: str | None,
           max_trials: int, allow_costly: bool, as_json: bool) -> None:
    """Find the smallest set of extra FP32 nodes with which every deployable form passes verify's gate
    (never by loosening it), and commit the repaired plan, model and report.

    Starts from the modules localisation names on the failing samples (what you would write as
    --keep-fp32-module), then narrows them to single nodes by delta debugging; each trial re-plans and
    runs the strict emulation in memory on the failing samples, and the result is verified on every
    sample before it is written. Writes repair.json (nodes, modules, trials, MACs moved to FP32) and
    repair.policy.toml (convert --policy reproduces the plan). Exit 0 repaired (or already passing),
    1 no set found (what was tried is printed), 2 bad input.

    \b
    Example:
      mpexport repair build/m && mpexport package build/m --out repo
    """
    _run_repair(directory, val_data, trust_pickle, factory, options, max_trials, as_json, allow_costly)


def _run_repair(directory: str, val_data: str | None, trust_pickle: bool, factory: str | None, options: VerifyOptions,
                max_trials: int, as_json: bool, allow_costly: bool = False) -> None:
    from mpexport.commands.repair import repair as run_repair

    with StageProgress(as_json) as progress:
        progress.stage("repair")
        result = run_repair(directory, val_data=val_data, options=options, trust_pickle=trust_pickle,
                            factory=factory, max_trials=max_trials, allow_costly=allow_costly,
                            on_trial=lambda number, _text: progress.advance(number, None))
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        print_repair(result, directory)
    if not result.passed:
        sys.exit(EXIT_PARITY_FAILED)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option("--format", "repository_format", type=click.Choice(FORMATS), default="triton", show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=str),
              help="Repository directory to write (must not exist unless --force).")
@click.option("--name", help="Model name in the repository (default: the source model's file name).")
@click.option("--max-batch-size", type=click.IntRange(1), help="Triton max_batch_size (default 64 when the "
              "batch dimension is dynamic).")
@click.option("--allow-unverified", is_flag=True, help="Package even though the last verify did not pass.")
@click.option("--force", is_flag=True, help="Replace an existing repository directory.")
def package(directory: str, repository_format: str, out: str, name: str | None, max_batch_size: int | None,
            allow_unverified: bool, force: bool) -> None:
    """Write a Triton Inference Server model repository for a converted and verified model.

    \b
    Example:
      mpexport package build/resnet --format triton --out triton_repo
      docker run --rm -p8000:8000 -v $PWD/triton_repo:/models <tritonserver image> \\
          tritonserver --model-repository=/models
    """
    from mpexport.commands.package import package as package_bundle

    result = package_bundle(directory, out, format=repository_format, name=name, max_batch_size=max_batch_size,
                            allow_unverified=allow_unverified, force=force)
    for model_name, platform in result.models.items():
        stdout.print(f"{result.out}/{model_name}: {platform}")
    print_notes(result.notes)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option("--shapes", multiple=True, metavar="NAME:MIN,OPT,MAX",
              help="Optimization profile for an input (default: from the recorded validation data).")
@click.option("--allow-tf32", is_flag=True, help="Let FP32 layers use TF32.")
@click.option("--workspace-gb", type=click.FloatRange(min=0.1), default=4.0, show_default=True)
def build(directory: str, shapes: tuple[str, ...], allow_tf32: bool, workspace_gb: float) -> None:
    """(Re)build the TensorRT engine of a converted model from its mixed-precision ONNX (strongly typed:
    the ONNX types are the precision contract), and check its layers against the plan.

    \b
    Example:
      mpexport build build/resnet --shapes pixels:1x1x8x8,32x1x8x8,256x1x8x8
    """
    from pathlib import Path

    from mpexport.commands.build import build as build_engine
    from mpexport.deploy.tensorrt import parse_shapes_option

    result = build_engine(Path(directory), shapes=parse_shapes_option(shapes), allow_tf32=allow_tf32,
                     workspace=int(workspace_gb * (1 << 30)))
    check = result.check
    stdout.print(escape(f"{result.path}: TensorRT {result.metadata['tensorrt']} on {result.metadata['gpu']}; "
                        f"{check.compared} layers compared with the plan, {len(check.mismatches)} disagree"),
                 soft_wrap=True)
    for mismatch in check.mismatches[:10]:
        stdout.print(f"[red]{mismatch['kind']}:[/] {escape(str(mismatch['layer']))} planned {mismatch['planned']}, "
                     f"runs {mismatch['realised']}", soft_wrap=True)
    if check.mismatches:
        sys.exit(EXIT_PARITY_FAILED)


@main.command()
def doctor() -> None:
    """Report what this machine can do: torch and CUDA, ONNX Runtime providers, TensorRT and the GPU, and
    which stages will run or be skipped, and why.

    \b
    Example:
      mpexport doctor
    """
    import onnxruntime
    import torch

    from mpexport.deploy.tensorrt import tensorrt_status

    status = tensorrt_status()
    cuda = torch.cuda.is_available()
    table = Table(title="mpexport doctor", title_justify="left")
    for column in ("component", "state"):
        table.add_column(column, overflow="fold")
    table.add_row("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}; GPU visible: "
                  f"{'yes, ' + torch.cuda.get_device_name(0) if cuda else 'no'})")
    table.add_row("ONNX Runtime", f"{onnxruntime.__version__}: {', '.join(onnxruntime.get_available_providers())}")
    stand_in = f" (a stand-in: {status.stand_in}, not TensorRT)" if status.stand_in else ""
    table.add_row("TensorRT", escape(f"{status.version}{stand_in}" if status.version else "not installed"))
    stages = [("load, export, plan, rewrite, lint", "run"),
              ("verify: torch-fp32, onnx-fp32, onnx-mixed, strict", "run"),
              ("verify: torch-amp for cuda-* policies", "real CUDA autocast" if cuda else
               "emulated on CPU from the CUDA autocast kernels (no GPU)"),
              ("engine (TensorRT)", "build" if status.available else f"skipped: {status.why}")]
    for stage, state in stages:
        table.add_row(stage, escape(state))
    stdout.print(table)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=str))
@click.option("--plan", "plan_path", type=click.Path(dir_okay=False, path_type=str),
              help="A plan.json whose precisions the model must realize.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def lint(model: str, plan_path: str | None, as_json: bool) -> None:
    """Check an ONNX model before deploying it: the full ONNX checker, ONNX Runtime loading, Cast types,
    FP16->FP32->FP16 rounding chains, and (with --plan) every node's precision against the plan.
    Exit code 1 when a check fails.

    \b
    Example:
      mpexport lint build/resnet/model.mixed.onnx --plan build/resnet/plan.json
    """
    from mpexport.graph.lint import lint_model
    from mpexport.precision.plan import PrecisionPlan

    result = lint_model(model, PrecisionPlan.load(plan_path) if plan_path else None)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
    else:
        table = Table(title=f"mpexport lint {model}", title_justify="left")
        for column in ("check", "status", "detail"):
            table.add_column(column, overflow="fold")
        colours = {"pass": "green", "fail": "red", "skipped": "yellow"}
        for check in result.checks:
            detail = escape(check.detail + ("; " + "; ".join(check.findings[:5]) if check.findings else ""))
            table.add_row(check.name, f"[{colours[check.status]}]{check.status}[/]", detail)
        stdout.print(table)
    if not result.ok:
        sys.exit(EXIT_PARITY_FAILED)


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the plan summary as JSON.")
@click.option("--nodes", is_flag=True, help="Also list every node with its precision and reason.")
def inspect(directory: str, as_json: bool, nodes: bool) -> None:
    """Show what runs in low precision and FP32 in a converted model, and why.

    Prints the plan summary, the FP32 keep-list grouped by reason and module, and how the plan differs from
    converting everything to low precision.

    \b
    Example:
      mpexport inspect build/resnet
      mpexport inspect build/resnet --json | jq .summary.precision
    """
    from mpexport.commands.inspect import inspect as inspect_bundle

    report = inspect_bundle(directory)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, sort_keys=True))
        return
    print_inspect(report, nodes)


if __name__ == "__main__":
    main()
