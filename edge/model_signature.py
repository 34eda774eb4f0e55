"""The bundle's second signature, in the OpenSSF model-signing format (the `model-signing` package, key-based,
offline): `model.sig` is a Sigstore bundle over every file of the bundle folder but itself, so a vehicle team can
check a bundle with nothing of patchwatch:

    model_signing verify key BUNDLE_FOLDER --signature BUNDLE_FOLDER/model.sig --public_key signing.pub

It signs what `manifest.sig` signs (the manifest lists every engine's SHA-256, and is itself covered), with the
same P-256 key; the runner keeps its own check of `manifest.sig` as the fast path (no Sigstore stack on a vehicle
at start-up), and the tests hold the two to the same verdict.
"""

from __future__ import annotations

import os
from pathlib import Path

from edge.signing import PASSPHRASE_ENV

MODEL_SIGNATURE = "model.sig"
#: what a model-signing signature may weigh (a Sigstore bundle JSON with one file digest per engine)
MODEL_SIGNATURE_MAX_BYTES = 256 * 1024


class ModelSignatureError(ValueError):
    """The model-signing signature of a bundle folder does not verify."""


def _hashing():
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[MODEL_SIGNATURE])


def sign_folder(folder: str | Path, private_key: str | Path) -> Path:
    """Write `folder/model.sig`: the OpenSSF model-signing signature of every other file in `folder`."""
    from model_signing import signing

    folder = Path(folder)
    signature = folder / MODEL_SIGNATURE
    passphrase = os.environ.get(PASSPHRASE_ENV)  # the library hands it to cryptography, which wants bytes
    signing.Config().use_elliptic_key_signer(private_key=Path(private_key),
                                             password=passphrase.encode() if passphrase else None) \
        .set_hashing_config(_hashing()).sign(folder, signature)
    return signature


def verify_folder(folder: str | Path, public_key: str | Path) -> None:
    """The stock model-signing verification of a bundle folder (raises `ModelSignatureError`)."""
    from model_signing import verifying

    folder = Path(folder)
    try:
        verifying.Config().use_elliptic_key_verifier(public_key=Path(public_key)).set_hashing_config(_hashing()) \
            .verify(folder, folder / MODEL_SIGNATURE)
    except Exception as exc:  # the library raises ValueError, its protobuf/crypto errors, FileNotFoundError
        raise ModelSignatureError(f"model-signing verification of {folder} failed: {type(exc).__name__}: {exc}") \
            from exc
