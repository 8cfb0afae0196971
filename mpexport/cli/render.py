"""What the commands print for people: tables, progress bars, stages (``--json`` prints the records instead)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mpexport.check.report import trained_accuracy_line

PIPE_WIDTH = 140
"""Width of tables written to a pipe or file (a terminal uses its own width)."""


stdout = Console(highlight=False, width=None if sys.stdout.isatty() else PIPE_WIDTH)


stderr = Console(stderr=True, highlight=False)


class StageProgress:
    """On stderr: the running stage, and a progress bar with the time left while samples are processed (silent
    with --json or when stderr is not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet or not stderr.is_terminal
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> StageProgress:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=stderr, transient=True)
            self.progress.__enter__()
            self.task = self.progress.add_task("starting", total=None)
        return self

    def stage(self, name: str) -> None:
        """A new stage started (its samples, if any, are counted from zero)."""
        if self.progress is not None:
            self.progress.reset(self.task, description=name, total=None)

    def advance(self, done: int, total: int | None) -> None:
        """``done`` of ``total`` samples processed in the current stage."""
        if self.progress is not None:
            self.progress.update(self.task, completed=done, total=total)

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc_info)


def print_convert(result: Any) -> None:
    """Convert's result as a table: each stage, what it found, the notes and the stages."""
    manifest = result.manifest
    table = Table(title=f"mpexport convert → {result.out}", show_header=True, title_justify="left")
    table.add_column("stage")
    table.add_column("result")
    source = manifest.source
    table.add_row("load", f"{source.format}  {escape(source.path)}")
    export = manifest.export
    table.add_row("export", f"{export.strategy} in {export.seconds} s, opset {export.opset}"
                  + (", external data" if export.external_data else ""))
    prov = manifest.provenance
    fused = prov.get("fused", {}).get("count") if isinstance(prov.get("fused"), dict) else None
    table.add_row("provenance", f"{prov['attributed']}/{prov['nodes']} nodes with module + aten op "
                  f"({prov['coverage']:.1%})" + (f", {fused} fused by the exporter's optimizer" if fused else ""))
    plan = manifest.plan
    if plan:
        counts = ", ".join(f"{count} {precision}" for precision, count in plan.summary["precision"].items())
        share = plan.summary["macs"]["low_precision_share"]
        table.add_row("plan", f"{plan.policy} ({escape(plan.policy_source)}) → {plan.target}: {counts}"
                      + (f"; {share:.1%} of MACs in {plan.target}" if share is not None else ""))
    check = manifest.export_check
    if check is None:
        table.add_row("export check", f"[yellow]skipped[/]: {escape(manifest.skip_reason('export check') or '')}")
    else:
        outputs = check.comparison["outputs"]
        worst = max(outputs.values(), key=lambda output: output["relative_error"]) if outputs else None
        verdict = "[green]pass[/]" if check.passed else "[red]FAIL[/]"
        table.add_row("export check", f"{verdict}  ONNX Runtime vs {escape(check.comparison['reference'])} on "
                      f"{check.comparison['samples']} samples"
                      + (f", max error {worst['relative_error']:.1e} of output scale (tolerance "
                         f"{check.comparison['rtol']:g})" if worst else ""))
    lint = manifest.lint
    if lint:
        statuses = ", ".join(f"{c['name']} {c['status']}" for c in lint.checks)
        table.add_row("mixed ONNX", f"{'[green]lint pass[/]' if lint.ok else '[red]lint FAIL[/]'}: {statuses}; "
                      f"{manifest.rewrite['casts_inserted']} casts inserted, "
                      f"{manifest.rewrite['initializers_converted']} initializers converted")
    if manifest.engine is not None:
        engine = manifest.engine
        table.add_row("engine", f"TensorRT {engine.tensorrt} on {engine.details.get('gpu')}: "
                      f"{engine.check['compared']} layers compared with the plan, {len(engine.check['mismatches'])} "
                      "disagree")
    elif manifest.skip_reason("engine"):
        table.add_row("engine", f"[yellow]skipped[/]: {escape(manifest.skip_reason('engine') or '')}")
    for key, artifact in manifest.artifacts.items():
        table.add_row(f"artifact {key}", ", ".join(sorted(artifact.sha256)))
    stdout.print(table)
    io = Table(show_header=True, title="inputs and outputs", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        io.add_column(column)
    for kind, specs in (("input", manifest.inputs), ("output", manifest.outputs)):
        for spec in specs:
            io.add_row(kind, spec.name, spec.dtype, "(" + ", ".join(map(str, spec.shape)) + ")")
    stdout.print(io)
    print_stages(manifest.stages.get("convert", []))
    print_notes(result.notes)


def print_notes(notes: list[str]) -> None:
    """Each note on its own line, ``note:`` first."""
    for note in notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)


def print_stages(stages: list[Any]) -> None:
    """One line: each stage that ran with its seconds and peak memory, then the stages skipped (why is in the
    table and the manifest)."""
    ran = [stage for stage in stages if stage.status != "skipped"]
    if not ran:
        return
    parts = [f"{stage.stage} {stage.seconds:.1f} s" + (f"/{stage.peak_rss_mb:,.0f} MB" if stage.peak_rss_mb else "")
             + (f" {stage.status.upper()}" if stage.status != "ran" else "") for stage in ran]
    total = sum(stage.seconds for stage in ran)
    skipped = [stage.stage for stage in stages if stage.status == "skipped"]
    tail = f"; skipped: {', '.join(skipped)}" if skipped else ""
    stdout.print(f"[dim]stages (seconds/peak RSS): {', '.join(parts)}; total {total:.1f} s{tail}[/]", soft_wrap=True)


def print_repair(result: Any, directory: str) -> None:
    """Repair's result: the nodes and modules moved to FP32 with their cost, or why nothing was committed."""
    if result.status == "already passing":
        stdout.print(f"[green]nothing to repair:[/] {directory} passes verify")
        return
    if result.status == "too costly":
        stdout.print(f"[red]not committed[/]: {escape(result.why or '')}; the set: {', '.join(result.nodes)}",
                     soft_wrap=True)
        print_notes(result.notes)
        return
    if result.status != "repaired":
        stdout.print(f"[red]no repair found[/] after {result.trials} trials: {escape(result.why or 'no set passed')}",
                     soft_wrap=True)
        for line in result.tried[-15:]:
            stdout.print(f"  {escape(line)}", soft_wrap=True)
        print_notes(result.notes)
        return
    macs = result.macs
    share = (f"; low-precision MAC share {macs['low_precision_share_before']:.1%} -> "
             f"{macs['low_precision_share_after']:.1%} ({macs['moved_to_fp32']:,} MACs moved to FP32)"
             if macs.get("low_precision_share_before") is not None else "")
    stdout.print(f"[green]repaired[/] {directory}: {len(result.nodes)} nodes kept FP32 after {result.trials} trials "
                 f"in {result.seconds:.1f} s{share}", soft_wrap=True)
    table = Table(title="moved to FP32", title_justify="left")
    for column in ("node", "op", "module", "why"):
        table.add_column(column, overflow="fold")
    for item in result.added_fp32:
        table.add_row(item["node"], item["op_type"], item["module"] or "", escape(item["reason"]))
    stdout.print(table)
    if result.modules:
        stdout.print(f"as modules: {', '.join(result.modules)}; policy file: {directory}/repair.policy.toml")
    print_notes(result.notes)
    stdout.print(f"verify now: [green]{result.report.verdict.upper()}[/] on {result.report.samples} samples")


class BatchProgress:
    """A progress bar over validation samples (or Ray shards) on stderr (silent with --json or off a terminal)."""

    def __init__(self, quiet: bool, description: str = "verifying") -> None:
        self.quiet = quiet or not stderr.is_terminal
        self.description = description
        self.progress: Any = None

    def __enter__(self) -> Callable[[int, int | None], None]:
        if self.quiet:
            return lambda _done, _total: None
        from rich.progress import Progress

        self.progress = Progress(console=stderr, transient=True)
        self.progress.__enter__()
        task = self.progress.add_task(self.description, total=None)
        return lambda done, total: self.progress.update(task, completed=done, total=total)

    def __exit__(self, *exc_info: object) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc_info)


def print_trained_accuracy(trained: dict[str, Any]) -> None:
    """The accuracy the training record reports beside the FP32 reference's on verify's labels, and whether the
    record measured the same data (:func:`mpexport.check.report.trained_accuracy_line`)."""
    line = trained_accuracy_line(trained)
    colour = "yellow" if trained.get("likely_not_trained_model") else "default"
    stdout.print(f"[{colour}]{escape(line)}[/]", soft_wrap=True)


def print_verify(report: Any, directory: str | None) -> None:
    """The verdict, a table of every backend's metrics against its budget, failures, localisation and notes."""
    colour = "green" if report.passed else "red"
    stdout.print(f"[bold {colour}]{report.verdict.upper()}[/]: {report.samples} samples from {escape(report.data)}")
    table = Table(title=f"parity against {next(iter(report.backends), 'torch-fp32')}", title_justify="left")
    for column in ("backend", "output", "max abs", "p99 abs", "min cosine", "SNR dB", "non-finite", "top-1",
                   "accuracy", "budget (atol)"):
        table.add_column(column, justify="right" if column not in ("backend", "output") else "left")
    for backend, outputs in report.metrics.items():
        for name, metric in outputs.items():
            data = metric.to_json()
            limits = report.thresholds.get(backend, {}).get(name)
            table.add_row(backend, name, f"{data['max_abs']:.3g}", f"{data['p99_abs']:.3g}",
                          f"{data['min_cosine']}", str(data["snr_db"]), str(data["nonfinite"]),
                          str(data.get("top1_agreement", "")), str(data.get("accuracy", "")),
                          f"{limits['atol']:.3g}" if limits else "noise floor")
    stdout.print(table)
    if report.trained:
        print_trained_accuracy(report.trained)
    for name, info in report.backends.items():
        if info.get("state") == "skipped":
            stdout.print(f"[yellow]skipped {name}:[/] {escape(info.get('why', ''))}", soft_wrap=True)
        elif info.get("state") == "failed":
            stdout.print(f"[red]failed {name}:[/] {escape(info.get('why', ''))}", soft_wrap=True)
        elif str(info.get("mode", "")).startswith("stand-in"):
            stdout.print(f"[yellow]{name} is a stand-in:[/] {escape(info['mode'])}", soft_wrap=True)
    for failure in report.failures:
        stdout.print(f"[red]fail:[/] {escape(failure)}", soft_wrap=True)
    for row in report.localisation:
        stdout.print(f"[red]first out of budget:[/] {row['node']} ({row['op_type']}, module "
                     f"{row.get('module')!s}, {row.get('precision')}): {escape(row['observed'])}"
                     + (f" — plan: {escape(row['reason'])}" if row.get("reason") else ""), soft_wrap=True)
    print_notes(report.notes)
    print_stages(report.stages)
    if directory:
        stdout.print(f"report: {directory}/report.json, {directory}/report.html")


def print_inspect(report: Any, show_nodes: bool) -> None:
    """The plan's policy and verdicts, precision by module and op, and every node with ``show_nodes``."""
    plan = report.plan
    summary = plan["summary"]
    stdout.print(f"[bold]{report.directory}[/]: trained under {plan['policy']} ({escape(report.policy_source)}), "
                 f"deployed as {plan['target']}", soft_wrap=True)
    stdout.print("verdicts: " + "; ".join(f"{name} {escape(state)}" for name, state in report.verdicts.items()),
                 soft_wrap=True)
    if report.repair:
        nodes, macs = report.repair.get("nodes", []), report.repair.get("macs", {})
        before, after = macs.get("low_precision_share_before"), macs.get("low_precision_share_after")
        share = "" if before is None else f"; low-precision MAC share {before:.1%} -> {after:.1%}"
        stdout.print(f"repair: {len(nodes)} nodes kept FP32 ({', '.join(nodes)}){share}", soft_wrap=True)
    for problem in report.damaged.values():
        stdout.print(f"[red]damaged:[/] {escape(problem)} — no verdict covers it as it is", soft_wrap=True)
    counts = Table(title="nodes per precision", title_justify="left")
    for column in ("precision", "nodes"):
        counts.add_column(column)
    for precision, count in summary["precision"].items():
        counts.add_row(precision, str(count))
    stdout.print(counts)
    ops = Table(title="per op type", title_justify="left")
    ops.add_column("op type")
    precisions = sorted({p for c in summary["op_types"].values() for p in c})
    for precision in precisions:
        ops.add_column(precision, justify="right")
    for op, counter in summary["op_types"].items():
        ops.add_row(op, *[str(counter.get(p, "")) for p in precisions])
    stdout.print(ops)
    macs = summary["macs"]
    if macs["total"]:
        stdout.print(f"multiply-accumulates in {plan['target']}: {macs['low_precision_share']:.1%} "
                     f"of {macs['total']:,}")
    keep = Table(title="FP32 keep-list (floating-point nodes not in low precision)", title_justify="left")
    for column in ("reason", "module", "nodes", "op types"):
        keep.add_column(column, overflow="fold")
    for group in report.keep_list:
        keep.add_row(escape(group["reason"]), group["module"], str(group["count"]), ", ".join(group["op_types"]))
    stdout.print(keep)
    naive = report.naive_difference
    stdout.print(f"versus converting every floating-point node to {plan['target']}: {naive['kept_fp32']} of "
                 f"{naive['float_nodes']} nodes stay FP32 ({naive['by_rule']})")
    for note in plan.get("notes", []):
        stdout.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if show_nodes:
        table = Table(title="nodes", title_justify="left")
        for column in ("node", "op", "module", "precision", "reason"):
            table.add_column(column, overflow="fold")
        for node in plan["nodes"]:
            table.add_row(node["name"], node["op_type"], node["module"] or "", node["precision"],
                          escape(node["reason"]))
        stdout.print(table)
