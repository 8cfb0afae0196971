"""`mpexport repair` on three traps, against contiguous-prefix bisection (Polygraphy's method) and
onnxconverter-common's `auto_convert_mixed_precision`.

    .venv/bin/python benchmarks/repair_bench.py [--workdir DIR] [--baselines-python /tmp/bvenv/bin/python]
    .venv/bin/python benchmarks/repair_bench.py --time-trials BUNDLE [--atol 1e-9]   # seconds per trial

The baseline venv: `python3 -m venv /tmp/bvenv && /tmp/bvenv/bin/pip install onnxconverter-common onnxruntime`.

Traps (320 validation samples, the last 40 rare; calibration sees the first 256; deployed FP16):
  mlp        RareOverflow (tests/toy_models.py), trained cuda-bf16: the square of one hidden unit of blocks.1
             overflows FP16 on the rare samples only.
  attention  an explicit attention block, trained cuda-bf16, whose query and key for a rare input align so that
             q.k overflows FP16 in the scores MatMul (softmax itself is FP32 by the policy).
  layernorm  features around 1000 with a spread of ~1, normalised by a LayerNorm the user forced to FP16
             (--force-low-op LayerNormalization, against cuda-fp16 training): FP16 rounds them to steps of 0.5, a
             precision loss without overflow.

Per trap: mpexport repair (set size, trials, seconds, trials/s, low-precision MAC share, verify afterwards);
prefix bisection (the smallest k such that the first k low-precision nodes in graph order kept FP32 pass the same
trial judge, bisected over k assuming monotonicity, as Polygraphy's `debug precision` does over layers), confirmed
on every sample as repair's result is; onnxconverter-common on the FP32 ONNX with 16 failing samples as its test
data (rtol 0.01), its model then verified by mpexport's strict emulation on every sample.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SAMPLES, RARE = 320, 40


def _attention_model():
    import torch
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(16, 64)
            self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64)
            self.head = nn.Linear(64, 10)
            with torch.no_grad():
                self.embed.weight[:, 15] = 0.0
                self.embed.weight[5, 15] = 8.0
                for layer in (self.q, self.k):
                    layer.weight[:, 5] = 0.0
                    layer.weight[:4, 5] = 30.0  # rare tokens: q and k of ~240 in 4 dims each, q.k ~ 2e5

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.embed(x))  # (batch, tokens, 64)
            scores = self.q(h) @ self.k(h).transpose(-1, -2)
            attention = torch.softmax(scores / 8.0, dim=-1)
            return self.head((attention @ self.v(h)).mean(dim=1))

    torch.manual_seed(0)
    return Attention().eval()


def _layernorm_model():
    import torch
    from torch import nn

    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(64)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(x))

    torch.manual_seed(0)
    return Normed().eval()


def build(trap: str, root: Path) -> tuple[Path, Path, list[str]]:
    """The trap's `.pt2`, validation data and convert options."""
    import torch

    from tests.toy_models import build_rare_overflow, rare_overflow_data

    rng = np.random.default_rng(0)
    if trap == "mlp":
        model, x, options = build_rare_overflow(), rare_overflow_data(SAMPLES, RARE), ["--amp-policy", "cuda-bf16"]
    elif trap == "attention":
        x = rng.standard_normal((SAMPLES, 8, 16)).astype(np.float32)
        x[:, :, 15] = 0.0
        x[SAMPLES - RARE:, :2, 15] = 1.0
        model, options = _attention_model(), ["--amp-policy", "cuda-bf16"]
    else:
        x = (1000 + rng.standard_normal((SAMPLES, 64))).astype(np.float32)
        model = _layernorm_model()
        options = ["--amp-policy", "cuda-fp16", "--force-low-op", "LayerNormalization"]
    program = torch.export.export(model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, root / f"{trap}.pt2")
    np.savez(root / f"{trap}.npz", x=x)
    return root / f"{trap}.pt2", root / f"{trap}.npz", [*options, "--target", "fp16"]


def convert(pt2: Path, val: Path, options: list[str], out: Path) -> None:
    from click.testing import CliRunner

    from mpexport.cli import main

    result = CliRunner().invoke(main, ["convert", str(pt2), "--val-data", str(val), "--out", str(out), *options])
    assert result.exit_code == 0, result.output


def run_repair(bundle: Path) -> dict:
    from mpexport.commands.repair import repair

    started = time.perf_counter()
    result = repair(bundle)
    return {"passes": result.passed, "set": len(result.nodes), "moved_to_fp32": len(result.added_fp32),
            "trials": result.trials, "seconds": round(time.perf_counter() - started, 2),
            "trials_per_second": result.to_json()["trials_per_second"],
            "low_share": result.macs.get("low_precision_share_after")}


def run_bisection(bundle: Path) -> dict:
    """Smallest prefix of the low-precision nodes (graph order) whose trial passes, bisected; then confirmed."""
    from mpexport.bundle.store import Bundle
    from mpexport.check.forms import load_inputs
    from mpexport.check.report import VerifyOptions
    from mpexport.check.verify import verify_forms
    from mpexport.minimize.search import Search
    from mpexport.precision.plan import read_plan

    started = time.perf_counter()
    opened = Bundle.open(bundle)
    options = VerifyOptions()
    inputs = load_inputs(opened, batch_size=options.batch_size)
    baseline = verify_forms(opened, inputs, options)
    plan = read_plan(opened)
    search = Search(opened, plan, inputs, options, baseline, f"strict-{plan.options.low}", 1000, None)
    candidates = search.trials.candidates
    low, high = 0, len(candidates)  # invariant: the first `high` pass
    if not search.trials.trial(frozenset(candidates), "all").passed:
        return {"passes": False, "set": None, "trials": search.count, "note": "even all FP32 fails"}
    while low < high:
        middle = (low + high) // 2
        if search.trials.trial(frozenset(candidates[:middle]), f"prefix {middle}").passed:
            high = middle
        else:
            low = middle + 1
    keep = frozenset(candidates[:high])
    repaired, report, directory = search.confirm(keep)
    shutil.rmtree(directory, ignore_errors=True)
    share = repaired.summary()["macs"]["low_precision_share"]
    return {"passes": report.passed, "set": high, "trials": search.count,
            "seconds": round(time.perf_counter() - started, 2), "low_share": share}


OCC_SCRIPT = """
import json, sys, time
import numpy as np, onnx
from onnxconverter_common.auto_mixed_precision import auto_convert_mixed_precision
source, feeds_path, target = sys.argv[1:4]
model = onnx.load(source)
feeds = dict(np.load(feeds_path))
started = time.perf_counter()
result = auto_convert_mixed_precision(model, feeds, rtol=0.01, keep_io_types=True)
seconds = time.perf_counter() - started
onnx.save(result, target)
print(json.dumps({"seconds": round(seconds, 2)}))
"""


def run_occ(bundle: Path, pt2: Path, val: Path, python: str | None, root: Path) -> dict:
    """onnxconverter-common's search on 16 failing samples, judged afterwards on every sample."""
    from mpexport.precision.plan import read_plan
    if not python:
        return {"note": "no --baselines-python"}
    from mpexport.bundle.names import FP32_ONNX
    from mpexport.bundle.store import Bundle
    from mpexport.check.forms import load_inputs
    from mpexport.check.report import VerifyOptions
    from mpexport.check.verify import verify_candidate, verify_forms

    opened = Bundle.open(bundle)
    options = VerifyOptions()
    baseline = verify_forms(opened, load_inputs(opened, batch_size=64), options)
    failing = baseline.failing_samples(f"strict-{read_plan(opened).options.low}")[:16]
    with np.load(val) as data:
        np.savez(root / "occ_feeds.npz", x=data["x"][failing])
    target = root / "occ.onnx"
    done = subprocess.run([python, "-c", OCC_SCRIPT, str(opened.path(FP32_ONNX)), str(root / "occ_feeds.npz"),
                           str(target)], capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        return {"note": f"failed: {done.stderr.strip().splitlines()[-1][:160]}"}
    seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
    report = verify_candidate(pt2, target, val, policy=read_plan(opened).policy.name, low="fp16")
    strict = report.metrics.get("strict-fp16", {})
    nonfinite = sum(metric.nonfinite for metric in strict.values())
    return {"passes": report.passed, "seconds": seconds, "strict_nonfinite": nonfinite,
            "onnx_runtime_passes": not any(line.startswith("onnx-candidate") for line in report.failures),
            "low_share": _low_share(target, opened)}


def _low_share(path: Path, bundle) -> float | None:
    """The MAC share of the bundle plan's MAC nodes that run FP16 in ``path`` (by node name)."""
    import onnx_ir as ir

    from mpexport.graph.contract import realized_precisions
    from mpexport.precision.plan import read_plan

    macs = {node.name: node.macs for node in read_plan(bundle).nodes if node.macs}
    realized = realized_precisions(ir.load(str(path)))
    total = sum(macs.values())
    low = sum(count for name, count in macs.items() if realized.get(name, ("fp32",))[0] == "fp16")
    return round(low / total, 4) if total else None


def time_trials(directory: Path, atol: float | None) -> None:
    """Seconds of one trial on an existing bundle (``--atol`` forces a failure on a bundle that passes)."""
    from mpexport.bundle.store import Bundle
    from mpexport.check.forms import load_inputs
    from mpexport.check.report import VerifyOptions
    from mpexport.check.verify import verify_forms
    from mpexport.minimize.search import Search
    from mpexport.precision.plan import read_plan

    bundle = Bundle.open(directory)
    options = VerifyOptions(atol=atol)
    inputs = load_inputs(bundle, batch_size=options.batch_size)
    started = time.perf_counter()
    baseline = verify_forms(bundle, inputs, options)
    print(f"baseline verify {time.perf_counter() - started:.1f} s: {baseline.verdict}")
    plan = read_plan(bundle)
    search = Search(bundle, plan, inputs, options, baseline, f"strict-{plan.options.low}", 100, None)
    for count in (0, 10, 40):
        started = time.perf_counter()
        search.trials.trial(frozenset(search.trials.candidates[:count]), f"first {count}")
        seconds = time.perf_counter() - started
        print(f"trial with {count} nodes FP32 on {len(search.trials.samples)} samples: {seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--baselines-python", help="Python of a venv with onnxconverter-common.")
    parser.add_argument("--traps", nargs="+", default=["mlp", "attention", "layernorm"])
    parser.add_argument("--time-trials", type=Path, metavar="BUNDLE", help="Only time trials on this bundle.")
    parser.add_argument("--atol", type=float, help="With --time-trials: a budget that makes the bundle fail.")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    if args.time_trials:
        time_trials(args.time_trials, args.atol)
        return
    root = args.workdir or Path(tempfile.mkdtemp(prefix="mpexport-repair-"))
    root.mkdir(parents=True, exist_ok=True)
    rows = {}
    for trap in args.traps:
        pt2, val, options = build(trap, root)
        bundle = root / f"{trap}-bundle"
        shutil.rmtree(bundle, ignore_errors=True)
        convert(pt2, val, options, bundle)
        copies = {name: root / f"{trap}-{name}" for name in ("repair", "bisection", "occ")}
        for copy in copies.values():
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(bundle, copy)
        rows[trap] = {"mpexport repair": run_repair(copies["repair"]),
                      "prefix bisection": run_bisection(copies["bisection"]),
                      "onnxconverter-common": run_occ(copies["occ"], pt2, val, args.baselines_python, root)}
    print(json.dumps(rows, indent=1))
    print("\n| trap | method | passes strict | set (nodes FP32) | trials | seconds | low-precision MAC share |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for trap, methods in rows.items():
        for method, row in methods.items():
            passes = row.get("passes", row.get("note", "-"))
            print(f"| {trap} | {method} | {passes} | {row.get('set', '-')} | {row.get('trials', '-')} "
                  f"| {row.get('seconds', '-')} | {row.get('low_share', '-')} |")


if __name__ == "__main__":
    main()
