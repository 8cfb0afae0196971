"""Training-framework callbacks that run :class:`mpexport.sources.range_monitor.RangeMonitor` in a framework's
training loop and write its record (``mpexport_ranges.json``) beside the checkpoints, where ``mpexport convert``
reads it: :mod:`mpexport.integrations.hf` (Hugging Face ``Trainer``), :mod:`mpexport.integrations.lightning`
(Lightning). Each imports its framework only when it is used."""
