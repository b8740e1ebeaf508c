"""`ssl run`: stages.yaml declared, ordered by outputs feeding inputs, run with skip and resume."""
