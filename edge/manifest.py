"""The signed manifest of an edge bundle, its strict parser, and one error class per way a bundle is refused.

The manifest lists every file of the bundle with its SHA-256 and size, the model's `ModelSpec`, its version
(monotonic per model name: a vehicle refuses an older one) and the signer's key id. It is parsed strictly: an
unknown field anywhere (the embedded spec included), a duplicated JSON key or a format version this runner does
not know is refused, so what was signed is exactly what is run.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from export.tensorrt_engine import PlanTarget
from segmenters.spec import ModelSpec

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
#: 2: the model version field, and manifest + signature as an archive's first two members
BUNDLE_FORMAT = 2
#: what a manifest or a signature may weigh: read before anything is verified, so bounded
MANIFEST_MAX_BYTES = 1 << 20
SIGNATURE_MAX_BYTES = 4096


class BundleError(Exception):
    """A bundle cannot be trusted or used; subclasses say why."""


class BundleFormatError(BundleError):
    """Not a bundle this runner can read: not an archive, truncated, or its members in the wrong order."""


class BundleManifestError(BundleError):
    """The signed manifest is not strictly what the format allows: an unknown field, a duplicated key, a bad value."""


class BundleVersionError(BundleError):
    """A manifest format version this runner does not know."""


class BundleKeyError(BundleError):
    """The bundle names another signer than the key given."""


class BundleSignatureError(BundleError):
    """The manifest's signature does not verify."""


class BundleMissingFileError(BundleError):
    """A file the manifest lists (or the manifest or signature itself) is absent."""


class BundleDigestError(BundleError):
    """A listed file's content differs from its signed SHA-256."""


class BundleSizeError(BundleError):
    """A member is larger than the manifest says (compared before hashing), or a read cap was reached."""


class BundleUnexpectedFileError(BundleError):
    """A file the manifest does not list."""


class BundleDuplicateError(BundleError):
    """The same name twice in an archive: which copy was verified and which is used would be ambiguous."""


class BundleMemberTypeError(BundleError):
    """A link (symbolic or hard), directory, device or FIFO where a regular file must be."""


class BundleTargetError(BundleError):
    """A TensorRT plan built for another TensorRT release or GPU than the target."""


class BundleRollbackError(BundleError):
    """A bundle whose version is not newer than the installed one (a replay of an older signed bundle)."""


class BundleInstallError(BundleError):
    """A verified bundle that cannot be installed: its engine does not load or fails the smoke inference."""


class BundleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    role: str  # onnx | tensorrt | plan_info
    sha256: str
    size: int = Field(ge=0)
    precision: str | None = None
    parity: dict[str, float | int | str] | None = None
    target: PlanTarget | None = None


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: int = BUNDLE_FORMAT
    name: str
    version: int = Field(ge=1, description="monotonic per model name: a vehicle refuses a bundle not newer")
    created_at: str
    spec: ModelSpec
    files: tuple[BundleFile, ...]
    versions: dict[str, str]
    signer: str

    def engines(self, role: str | None = None) -> list[BundleFile]:
        return [f for f in self.files if f.role in ("onnx", "tensorrt") and (role is None or f.role == role)]

    def entry(self, name: str) -> BundleFile | None:
        return next((f for f in self.files if f.path == name), None)

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    duplicated = sorted({key for key in keys if keys.count(key) > 1})
    if duplicated:
        raise BundleManifestError(f"the signed manifest repeats the JSON key(s) {duplicated}: refused, since "
                                  "parsers disagree on which value wins")
    return dict(pairs)


def claimed_signer(manifest_bytes: bytes) -> str | None:
    """The signer the (not yet verified) manifest claims, only to name a wrong key as such."""
    try:
        data = json.loads(manifest_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("signer") if isinstance(data, dict) and isinstance(data.get("signer"), str) else None


def parse_manifest(manifest_bytes: bytes) -> Manifest:
    """The signed (already verified) manifest bytes -> `Manifest`, strictly."""
    try:
        data = json.loads(manifest_bytes, object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleManifestError(f"the signed manifest is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BundleManifestError("the signed manifest is not a JSON object")
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleVersionError(f"bundle format {data.get('format')!r}: this runner reads format {BUNDLE_FORMAT} "
                                 "only (re-bundle the engines with this patchwatch)")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise BundleManifestError(f"the signed manifest does not fit bundle format {BUNDLE_FORMAT}: {fields}") from exc
    names = [f.path for f in manifest.files]
    if len(set(names)) != len(names):
        raise BundleManifestError(f"the signed manifest lists a file twice: {names}")
    for name in names:
        if name in (MANIFEST, SIGNATURE) or not _plain_name(name):
            raise BundleManifestError(f"the signed manifest names a file outside the bundle folder: {name!r}")
    return manifest


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
