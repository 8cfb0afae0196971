"""Other people's ONNX models through mpexport as a new user runs it, and mpexport judging other converters.

    .venv/bin/python benchmarks/peer_corpus.py [--work DIR] [--json PATH] [-k NAME ...] [--no-judges]
                                               [--modelopt-path DIR]

1. Every model of the corpus (``tests/corpus``: graphs rebuilt from onnxconverter-common's, ModelOpt AutoCast's and
   ONNX Runtime's own tests, the tiny BERT through the TorchScript exporter, ORT's optimizer and the dynamo
   exporter, an IR-3 CNN, RNNs, scalar inputs) goes through ``mpexport convert MODEL --val-data V --out B`` and
   ``mpexport verify B``, each a fresh CLI process with no other option. Prints one row per model (convert exit,
   verify exit, verdict, low-precision MAC share, the first line of any error, whether it met the corpus'
   expectations) and ``converted N/M, verified K/M without workaround``.
2. The hidden-size BERT (``bert_ortopt_op17``: the ORT-optimized tiny BERT, ``optimize_model(..., num_heads=4,
   hidden_size=32)``) converted by onnxconverter-common (``convert_float_to_float16(model, keep_io_types=True)``)
   and by ModelOpt's AutoCast with its defaults (``convert_to_mixed_precision(onnx_path, keep_io_types=True)``;
   AutoCast's reference runner is given the validation inputs, since its default random inputs are not token
   ids), each judged with ``mpexport verify --reference fp32.onnx --candidate X.onnx --val-data V``: the verdict and
   the worst metric against its budget, and the constants the converter changed beyond rounding (verify's note).

ModelOpt's ``nvidia-modelopt[onnx]`` pulls onnxruntime-gpu and an older onnx, which would replace the venv's; put
its pure-Python parts in a separate directory instead and name it:

    .venv/bin/python -m pip install --no-deps --target /tmp/modelopt-site nvidia-modelopt onnx_graphsurgeon \\
        polygraphy onnxslim nvidia-ml-py omegaconf lief cppimport
    .venv/bin/python benchmarks/peer_corpus.py --modelopt-path /tmp/modelopt-site

The mpexport that runs is the one ``python -m mpexport.cli`` imports: ``PYTHONPATH=/tmp/head`` runs another
checkout (e.g. ``git archive HEAD mpexport | tar -x -C /tmp/head`` for the numbers before a change).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.corpus import BY_NAME, ENTRIES, build  # noqa: E402
from tests.corpus.checks import (  # noqa: E402
    Outcome,
    failure_line,
    first_line,
    judge,
    load_bundle_files,
    samples_in,
)
from tests.corpus.entry import Entry  # noqa: E402

JUDGED = ("bert_ortopt_op17", "bert_ts_op13")  # the hidden-size BERT, and the same BERT before ORT's optimizer
CLI = [sys.executable, "-m", "mpexport.cli"]
# Commands run in an empty directory: ``python -m`` puts its working directory first on sys.path, and the checkout
# there would shadow a PYTHONPATH naming another mpexport.
EMPTY = Path(tempfile.gettempdir())


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A command, its output captured as text, run in :data:`EMPTY`."""
    return subprocess.run(args, capture_output=True, text=True, cwd=EMPTY, env=env, check=False)


def convert_and_verify(entry: Entry, work: Path) -> tuple[Outcome, list[str], float]:
    """``mpexport convert`` then ``mpexport verify``, each a fresh process, nothing but ``--val-data``; the outcome,
    what fell short of the entry's expectations, and the seconds both took."""
    built = build(entry, work / "models")
    bundle = work / "bundles" / entry.name
    start = time.perf_counter()
    converted = run([*CLI, "convert", str(built.model), "--val-data", str(built.val), "--out", str(bundle),
                     "--force"])
    outcome = Outcome(converted.returncode, converted.stderr, bundle, converted.stdout)
    if converted.returncode == 0:
        verified = run([*CLI, "verify", str(bundle)])
        outcome.verify_exit, outcome.verify_error = verified.returncode, verified.stderr
    load_bundle_files(outcome)
    seconds = time.perf_counter() - start
    return outcome, judge(entry, outcome, samples_in(built.val)), seconds


def error_line(outcome: Outcome, problems: list[str]) -> str:
    """The first line of the first error: convert's, verify's, else the first failed gate or expectation."""
    if outcome.convert_exit:
        return failure_line(outcome)
    line = first_line(outcome.verify_error)
    if line:
        return line
    failures = (outcome.report or {}).get("failures") or []
    return str(failures[0]) if failures else (problems[0] if problems else "")


def corpus_table(entries: list[Entry], work: Path) -> list[dict]:
    """One row per entry, printed as it completes."""
    rows = []
    header = f"{'model':<26} {'conv':>4} {'ver':>4} {'verdict':<8} {'low MAC':>7} {'as expected':<11} error"
    print(header)
    print("-" * len(header))
    for entry in entries:
        outcome, problems, seconds = convert_and_verify(entry, work)
        share = outcome.low_mac_share
        row = {"model": entry.name, "convert_exit": outcome.convert_exit, "verify_exit": outcome.verify_exit,
               "verdict": outcome.verdict, "low_mac_share": share, "as_expected": not problems,
               "xfail": entry.expect.xfail, "error": error_line(outcome, problems), "problems": problems,
               "seconds": round(seconds, 1)}
        rows.append(row)
        shown = "-" if share is None else f"{share:.1%}"
        verify_exit = "-" if outcome.verify_exit is None else outcome.verify_exit
        print(f"{entry.name:<26} {outcome.convert_exit:>4} {verify_exit:>4} {outcome.verdict:<8} {shown:>7} "
              f"{'yes' if not problems else 'no':<11} {row['error'][:150]}", flush=True)
    return rows


def worst_metric(report: dict) -> str:
    """The candidate's metric closest to (or furthest past) its budget: ``backend output max_abs X (budget Y),
    min cosine Z``."""
    worst, ratio = "", -1.0
    for backend, outputs in (report.get("thresholds") or {}).items():
        for output, limits in outputs.items():
            metrics = (report.get("metrics") or {}).get(backend, {}).get(output, {})
            atol, error = limits.get("atol"), metrics.get("max_abs")
            if atol and error is not None and error / atol > ratio:
                ratio = error / atol
                worst = (f"{backend} {output}: max abs {error:.3g} (budget {atol:.3g}), min cosine "
                         f"{metrics.get('min_cosine')}, non-finite {metrics.get('nonfinite')}")
    return worst or "; ".join(map(str, report.get("failures") or [])) or "no gated metric"


def judge_candidate(name: str, fp32: Path, candidate: Path, val: Path) -> dict:
    """``mpexport verify --reference fp32 --candidate X --val-data V --json``: exit code, verdict, worst metric;
    whether ONNX Runtime loads the candidate at all."""
    import onnxruntime as ort

    row: dict = {"converter": name, "candidate": str(candidate)}
    try:
        ort.InferenceSession(str(candidate), providers=["CPUExecutionProvider"])
        row["ort_loads"] = True
    except Exception as error:  # noqa: BLE001 - what ORT says is the result
        row["ort_loads"], row["ort_error"] = False, first_line(str(error))[:300]
    result = run([*CLI, "verify", "--reference", str(fp32), "--candidate", str(candidate), "--val-data", str(val),
                  "--json"])
    row["verify_exit"] = result.returncode
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        row["verdict"], row["worst"] = "no report", first_line(result.stderr)[:300]
        return row
    row["verdict"], row["worst"] = report.get("verdict"), worst_metric(report)
    row["failures"] = report.get("failures")
    row["changed_constants"] = next((note for note in report.get("notes", [])
                                     if "of the candidate's constants" in note), None)
    return row


def onnxconverter_common_candidate(fp32: Path, out: Path) -> Path:
    """onnxconverter-common's FP16 model of ``fp32``, keeping FP32 inputs and outputs."""
    import onnx
    from onnxconverter_common.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
    onnx.save(model, str(out))
    return out


AUTOCAST = """
import sys
import numpy as np, onnx
from modelopt.onnx.autocast import convert_to_mixed_precision
fp32, out, val, inputs = sys.argv[1:5]
with np.load(val) as data:
    np.savez(inputs, **{name: data[name] for name in data.files if name != "labels"})
model = convert_to_mixed_precision(onnx_path=fp32, keep_io_types=True, calibration_data=inputs)
onnx.save(model, out)
"""


def autocast_candidate(fp32: Path, val: Path, out: Path, modelopt_path: str | None) -> tuple[Path | None, str]:
    """ModelOpt AutoCast's mixed model of ``fp32`` with its defaults, run in a child process (ModelOpt's imports stay
    out of this one); ``(None, why)`` when AutoCast cannot be imported or fails."""
    env = dict(os.environ)
    if modelopt_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [modelopt_path, env.get("PYTHONPATH")]))
    probe = run([sys.executable, "-c", "import modelopt.onnx.autocast"], env=env)
    if probe.returncode != 0:
        lines = [line for line in probe.stderr.splitlines() if line.strip()]
        return None, f"modelopt.onnx.autocast cannot be imported: {lines[-1] if lines else '?'}"
    result = run([sys.executable, "-c", AUTOCAST, str(fp32), str(out), str(val), str(out.with_suffix(".inputs.npz"))],
                 env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        return None, f"AutoCast failed: {lines[-1] if lines else '?'}"
    return out, ""


def judges(work: Path, modelopt_path: str | None) -> list[dict]:
    """onnxconverter-common's and AutoCast's outputs of the hidden-size BERT (and of the same BERT before ORT's
    optimizer), judged by mpexport."""
    rows = []
    for name in JUDGED:
        built = build(BY_NAME[name], work / "models")
        out = work / "judged" / name
        out.mkdir(parents=True, exist_ok=True)
        found = []
        try:
            candidate = onnxconverter_common_candidate(built.model, out / "onnxconverter_common.onnx")
            found.append(judge_candidate("onnxconverter-common", built.model, candidate, built.val))
        except Exception as error:  # noqa: BLE001 - a converter that fails is a result
            found.append({"converter": "onnxconverter-common", "verdict": "not converted",
                          "worst": first_line(str(error))[:300]})
        candidate_path, why = autocast_candidate(built.model, built.val, out / "autocast.onnx", modelopt_path)
        if candidate_path is None:
            found.append({"converter": "ModelOpt AutoCast", "verdict": "not converted", "worst": why})
        else:
            found.append(judge_candidate("ModelOpt AutoCast", built.model, candidate_path, built.val))
        print(f"\n{name} judged by mpexport verify --reference {built.model.name} --candidate X --val-data "
              f"{built.val.name}:")
        for row in found:
            row["model"] = name
            loads = "" if row.get("ort_loads", True) else f" [ONNX Runtime cannot load it: {row.get('ort_error')}]"
            print(f"  {row['converter']:<22} verify exit {row.get('verify_exit', '-')}, verdict {row['verdict']}: "
                  f"{row['worst']}{loads}")
            if row.get("changed_constants"):
                print(f"  {'':<22} {row['changed_constants']}")
        rows += found
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="where models and bundles go (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the table and the judges' verdicts as JSON")
    parser.add_argument("-k", dest="names", action="append", help="only this entry (repeat for several)")
    parser.add_argument("--no-judges", action="store_true", help="skip onnxconverter-common / AutoCast")
    parser.add_argument("--modelopt-path", help="a directory holding modelopt (see above), put on its PYTHONPATH")
    args = parser.parse_args()
    entries = [BY_NAME[name] for name in args.names] if args.names else ENTRIES
    global EMPTY
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory() as empty:
        work, EMPTY = args.work or Path(scratch), Path(empty)
        which = run([*CLI[:1], "-c", "import mpexport; print(mpexport.__file__)"]).stdout.strip()
        print(f"mpexport from {which}; {len(entries)} models; work in {work}\n")
        rows = corpus_table(entries, work)
        converted = sum(row["convert_exit"] == 0 for row in rows)
        verified = sum(row["verdict"] == "pass" for row in rows)
        summary = f"converted {converted}/{len(rows)}, verified {verified}/{len(rows)} without workaround"
        print(f"\n{summary}; as expected {sum(row['as_expected'] for row in rows)}/{len(rows)}")
        judged = [] if args.no_judges else judges(work, args.modelopt_path)
    if args.json:
        args.json.write_text(json.dumps({"mpexport": which, "summary": summary, "models": rows, "judges": judged},
                                        indent=2))


if __name__ == "__main__":
    main()
