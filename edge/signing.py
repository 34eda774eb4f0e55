"""ECDSA P-256 keys and signatures (the `cryptography` library). Keys live in PEM files, never in code; a
private key may be passphrase-protected (the passphrase comes from an environment variable).

P-256 because it is the curve the OpenSSF model-signing verifier takes for key-based signatures: the one key pair
signs the manifest (the runner's fast check) and the bundle folder in the model-signing format (`model.sig`),
which a vehicle team can verify with the stock `model_signing verify key`."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

PASSPHRASE_ENV = "PATCHWATCH_KEY_PASSPHRASE"
CURVE = ec.SECP256R1()


class KeyFileError(ValueError):
    """A key file is missing, unreadable, or not an ECDSA P-256 key."""


def generate_keypair(out_dir: str | Path, name: str = "signing", passphrase: bytes | None = None) -> tuple[Path, Path]:
    """Write `<name>.key` (private, mode 0600) and `<name>.pub`; refuses to overwrite an existing key. A folder
    it creates gets mode 0700."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(f"{path} exists; refusing to overwrite a key")
    key = ec.generate_private_key(CURVE)
    encryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private_path, public_path


def git_work_tree(path: str | Path) -> Path | None:
    """The top of the git work tree `path` would be written into (`path` need not exist yet: its nearest existing
    folder is asked), or None. Asks git (`rev-parse --show-toplevel`) and also looks for a `.git` up the tree,
    so a machine without git, or a repository git refuses to read (another owner's), still counts."""
    folder = Path(path).expanduser().absolute()
    while not folder.is_dir():
        folder = folder.parent
    try:
        asked = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=folder, capture_output=True, text=True,
                               timeout=30)
        if asked.returncode == 0 and asked.stdout.strip():
            return Path(asked.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine
        pass
    return next((parent for parent in (folder, *folder.parents) if (parent / ".git").exists()), None)


def load_private_key(path: str | Path) -> ec.EllipticCurvePrivateKey:
    data = _read(path, "private key")
    passphrase = os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=passphrase.encode() if passphrase else None)
    except TypeError as exc:
        raise KeyFileError(f"{path} is passphrase-protected: set {PASSPHRASE_ENV}") from exc
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a readable PEM private key ({exc})") from exc
    _check_curve(path, key, "private")
    return key


def load_public_key(path: str | Path) -> ec.EllipticCurvePublicKey:
    data = _read(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a readable PEM public key ({exc})") from exc
    _check_curve(path, key, "public")
    return key


def _check_curve(path, key, kind: str) -> None:
    if not isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) or key.curve.name != CURVE.name:
        held = getattr(getattr(key, "curve", None), "name", type(key).__name__)
        raise KeyFileError(f"{path} holds a {held} key, expected an ECDSA P-256 ({CURVE.name}) {kind} key "
                           "(make one with `patchwatch edge keygen`)")


def key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """Short fingerprint of a public key, recorded in manifests so a wrong key is named as such."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return "p256:" + hashlib.sha256(der).hexdigest()[:16]


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    return private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def signature_valid(public_key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _read(path: str | Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"{what} file not found: {path}")
    return path.read_bytes()
