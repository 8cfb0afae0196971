"""Which training policy a plan uses, from the best evidence: the user's options, else the training record the
model file carries, else the default; and the notes that say which and why."""

from __future__ import annotations

from dataclasses import replace

from mpexport.base.dtypes import CANONICAL_NAMES, LOW_PRECISIONS
from mpexport.base.policies import DEFAULT_POLICY
from mpexport.precision.options import PlanOptions
from mpexport.sources.model import LoadedModel


def training_policy(loaded: LoadedModel) -> str | None:
    """The autocast policy name a model's training record settles (``cpu-bf16``...), if any: None when there is
    no record, the record says the run used no autocast, or it names a device or type autocast policies lack."""
    autocast = loaded.training.get("autocast") if loaded.training else None
    if not isinstance(autocast, dict) or autocast.get("enabled") is False:
        return None
    low = CANONICAL_NAMES.get(str(autocast.get("dtype")).removeprefix("torch."))
    device = autocast.get("device_type")
    return f"{device}-{low}" if device in ("cpu", "cuda") and low in LOW_PRECISIONS else None


def options_source(options: PlanOptions | None, loaded: LoadedModel) -> str:
    """Where the policy came from, in words: the training record's evidence (file and fields), the caller's
    choice (and the record it contradicts, if any), or the default (and why the record did not settle it)."""
    record = training_policy(loaded)
    evidence = str(loaded.training.get("evidence") or "training record in the model file")
    if options is not None and options.policy:
        contradicted = _contradicted_record(options, loaded)
        return f"given: --amp-policy {options.policy} contradicts the training record ({contradicted}: {evidence})" \
            if contradicted else "given"
    if record is not None:
        return evidence
    if loaded.training.get("evidence"):
        autocast = loaded.training.get("autocast")
        why = "trained without autocast" if isinstance(autocast, dict) and autocast.get("enabled") is False \
            else "does not settle the training precision"
        return f"default ({DEFAULT_POLICY}): the record {why} ({evidence})"
    return "default"


def record_notes(options: PlanOptions | None, loaded: LoadedModel) -> list[str]:
    """What the manifest and CLI say about the training record: a contradicting --amp-policy, and what the
    record's reader assumed rather than read."""
    notes = [f"training record: {assumption}" for assumption in loaded.training.get("assumptions", [])]
    contradicted = _contradicted_record(options, loaded)
    if options is not None and contradicted:
        notes.append(f"--amp-policy {options.policy} contradicts the training record, which says {contradicted} "
                     f"({loaded.training.get('evidence', 'in the model file')}): planned with {options.policy}")
    return notes


def _contradicted_record(options: PlanOptions | None, loaded: LoadedModel) -> str | None:
    """The policy the training record settles, when the caller's ``--amp-policy`` says another one."""
    record = training_policy(loaded)
    given = options.policy if options is not None else ""
    return record if given and record is not None and record != given else None


def plan_options_for(options: PlanOptions | None, loaded: LoadedModel) -> PlanOptions:
    """``options`` (a copy) with the policy and torch version filled in from the training record where not given."""
    options = replace(options) if options is not None else PlanOptions()
    if not options.policy:
        options.policy = training_policy(loaded) or DEFAULT_POLICY
    if options.torch_version is None and loaded.training.get("torch"):
        options.torch_version = str(loaded.training["torch"])
    return options
