"""Datasets for the end-to-end benchmark: manifests (``load_manifest``) and a synthetic writer.

Importing this package imports no torch or numpy: the CLI's parser imports it.
"""

from crossspec_kernels.datasets.manifest import ManifestError, ManifestSample, load_manifest
from crossspec_kernels.datasets.synth import MANIFEST_NAME, write_synthetic_dataset

__all__ = ["MANIFEST_NAME", "ManifestError", "ManifestSample", "load_manifest", "write_synthetic_dataset"]
