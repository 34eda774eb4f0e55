"""Edge: signed bundles for vehicles, their verification, and the runner that executes them without Ray."""

from edge.bundle import (
    BundleDigestError, BundleError, BundleFormatError, BundleKeyError, BundleMissingFileError,
    BundleSignatureError, BundleTargetError, BundleUnexpectedFileError, Manifest, VerifiedBundle, create_bundle,
    verify_bundle,
)
from edge.runner import run_bundle, run_engine, select_engine
from edge.signing import KeyFileError, generate_keypair

__all__ = [
    "BundleDigestError", "BundleError", "BundleFormatError", "BundleKeyError", "BundleMissingFileError",
    "BundleSignatureError", "BundleTargetError", "BundleUnexpectedFileError", "KeyFileError", "Manifest",
    "VerifiedBundle", "create_bundle", "generate_keypair", "run_bundle", "run_engine", "select_engine",
    "verify_bundle",
]
