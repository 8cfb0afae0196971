"""What every stage uses: errors, tensor specs and batches, precisions and their types, policy names, stage statuses,
file hashing and JSON, user code named on the command line. Imports nothing else of mpexport."""
