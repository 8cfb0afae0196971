"""``verify``: check a bundle's deployable forms on the validation set, in one process or on Ray, and commit the
reports and the verdict."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mpexport.base.status import StageClock
from mpexport.bundle.names import ENGINE, FP32_ONNX, MIXED_ONNX, PLAN
from mpexport.bundle.store import Bundle
from mpexport.check.forms import load_inputs, model_batch_size
from mpexport.check.report import ParityReport, VerifyOptions
from mpexport.check.verify import verify_forms
from mpexport.commands.records import write_reports


def verify(directory: str | Path, *, val_data: str | Path | None = None, options: VerifyOptions | None = None,
           trust_pickle: bool = False, factory: str | None = None,
           on_batch: Callable[[int, int | None], None] | None = None,
           write: bool = True, reference: str | Path | None = None, ray: Any = None,
           on_shard: Callable[[int, int], None] | None = None) -> ParityReport:
    """Verify a bundle (the output directory of ``convert``): check its artifacts' hashes, run every backend on
    the validation data, gate, localise, and (``write``) store ``report.json``/``report.html`` and the verdict in
    the bundle, recording which artifacts the verdict covers. ``reference``: a PyTorch model to compare with (for
    a bundle converted from ONNX, which otherwise uses its FP32 ONNX as the reference). ``ray``: a
    :class:`mpexport.check.ray.RayOptions` to run the batches on a Ray cluster (``on_shard`` hears shards done) for
    the same report. A model that fixes its batch size is verified in batches of that size (one sample per
    run where an input without a batch axis holds a value per sample), whatever ``options.batch_size`` says
    (:func:`mpexport.check.forms.model_batch_size`: the report notes it). ``factory`` and
    ``trust_pickle``: the code the source (or reference) model needs, as the caller
    names it; what convert recorded is never run on its own (:func:`mpexport.check.forms.load_inputs`)."""
    options = options or VerifyOptions()
    if ray is not None:
        from mpexport.check.ray import verify_on_ray

        report, bundle = verify_on_ray(directory, ray, val_data=val_data, options=options, trust_pickle=trust_pickle,
                                       reference=reference, factory=factory, on_shard=on_shard)
    else:
        clock = StageClock()
        with clock.stage("open"):
            bundle = Bundle.open(directory, uses=(FP32_ONNX, MIXED_ONNX, PLAN, ENGINE))
        with clock.stage("load"):
            inputs = load_inputs(bundle, val_data=val_data, trust_pickle=trust_pickle, batch_size=options.batch_size,
                                 reference=reference, columns=options.columns or None, factory=factory)
            options, note = model_batch_size(options, inputs.specs, inputs.data)
        report = verify_forms(bundle, inputs, options, on_batch, clock=clock)
        report.stages = clock.stages
        report.notes += [note] if note else []
    if write:
        with bundle.transaction("verify") as transaction:
            write_reports(transaction, report, "verify")
    return report
