"""ssl-cli: self-supervised visual representation learning as resumable command-line stages."""

__version__ = "0.1.0"

# The major version enters every fingerprint: bump it when a stage's result changes for the same
# config and inputs, so old artifacts are recomputed rather than trusted.
CODE_MAJOR = 1
