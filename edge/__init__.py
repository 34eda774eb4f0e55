"""Edge: signed bundles for vehicles, their verification before unpacking, installation with anti-rollback, and the
runner that executes them without Ray."""

from edge.bundle import create_bundle
from edge.manifest import (
    BundleDigestError, BundleDuplicateError, BundleError, BundleFormatError, BundleKeyError, BundleManifestError,
    BundleMemberTypeError, BundleMissingFileError, BundleRollbackError, BundleSignatureError, BundleSizeError,
    BundleTargetError, BundleUnexpectedFileError, BundleVersionError, Manifest,
)
from edge.runner import run_bundle, run_engine, select_engine
from edge.signing import KeyFileError, generate_keypair
from edge.verify import VerifiedBundle, verify_bundle

__all__ = [
    "BundleDigestError", "BundleDuplicateError", "BundleError", "BundleFormatError", "BundleKeyError",
    "BundleManifestError", "BundleMemberTypeError", "BundleMissingFileError", "BundleRollbackError",
    "BundleSignatureError", "BundleSizeError", "BundleTargetError", "BundleUnexpectedFileError", "BundleVersionError",
    "KeyFileError", "Manifest", "VerifiedBundle", "create_bundle", "generate_keypair", "run_bundle", "run_engine",
    "select_engine", "verify_bundle",
]
