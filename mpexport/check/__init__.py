"""Parity checks: metrics, comparisons, the registered backends, tallies, the gate, localisation, reports, and
verify spread over Ray."""
