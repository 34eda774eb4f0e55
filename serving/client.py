"""A client for the service, and a served model behind the `Engine` interface (`RemoteEngine`), so the monitor
and engine replay hold a served engine exactly as they hold a local one. Speaks the same codec as the server."""

from __future__ import annotations

import numpy as np
import requests

from export.engine import Engine, EngineError
from segmenters.spec import ModelSpec
from serving.protocol import HEADER_LENGTH, ProtocolError, decode_infer_response, encode_infer_request


class OipError(RuntimeError):
    """The server answered with an error: `status` and its `{"error"}` message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class OipClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def _model_path(self, name: str, version: str | None) -> str:
        return f"{self.url}/v2/models/{name}" + (f"/versions/{version}" if version else "")

    def _check(self, answer: requests.Response) -> requests.Response:
        if answer.status_code >= 400:
            try:
                message = answer.json()["error"]
            except Exception:
                message = answer.text[:500]
            raise OipError(answer.status_code, message)
        return answer

    def server_metadata(self) -> dict:
        return self._check(self.session.get(f"{self.url}/v2", timeout=self.timeout)).json()

    def live(self) -> bool:
        return self.session.get(f"{self.url}/v2/health/live", timeout=self.timeout).status_code == 200

    def ready(self) -> bool:
        return self.session.get(f"{self.url}/v2/health/ready", timeout=self.timeout).status_code == 200

    def model_metadata(self, name: str, version: str | None = None) -> dict:
        return self._check(self.session.get(self._model_path(name, version), timeout=self.timeout)).json()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        answer = self.session.get(self._model_path(name, version) + "/ready", timeout=self.timeout)
        return answer.status_code == 200

    def infer(self, name: str, inputs: dict[str, np.ndarray], outputs: dict[str, bool] | None = None,
              version: str | None = None, binary: bool = True) -> dict[str, np.ndarray]:
        """Named input arrays -> named output arrays. `outputs` maps names to "return as binary" (default: all
        outputs, binary when `binary`); `binary` also sends the inputs with the binary extension."""
        body, headers = encode_infer_request(inputs, outputs, binary_inputs=binary,
                                             binary_output=binary and outputs is None)
        answer = self._check(self.session.post(self._model_path(name, version) + "/infer", data=body,
                                               headers=headers, timeout=self.timeout))
        try:
            _, arrays = decode_infer_response(answer.content, answer.headers.get(HEADER_LENGTH))
        except ProtocolError as exc:
            raise OipError(answer.status_code, f"unreadable response: {exc.message}") from None
        return arrays

    def segment(self, name: str, image: bytes, output: str = "labels", content_type: str = "image/png",
                version: str | None = None) -> requests.Response:
        answer = self.session.post(self._model_path(name, version) + "/segment", params={"output": output},
                                   data=image, headers={"Content-Type": content_type}, timeout=self.timeout)
        return self._check(answer)


class RemoteEngine(Engine):
    """A model served over the Open Inference Protocol, used like any local engine."""

    def __init__(self, url: str, model: str, version: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0):
        self.client = OipClient(url, api_key, timeout)
        self.model, self.version = model, version
        meta = self.client.model_metadata(model, version)
        if "model_spec" not in meta:
            raise EngineError(f"{url} model {model!r} publishes no model_spec: not a patchwatch server?")
        self.spec = ModelSpec.model_validate(meta["model_spec"])
        parameters = meta.get("parameters", {})
        self.precision, self.device = parameters.get("precision", "fp32"), parameters.get("device", "remote")
        self.backend = f"oip:{self.client.url}/{model}"

    def _run(self, images: np.ndarray) -> np.ndarray:
        return self.client.infer(self.model, {"images": images}, {"logits": True}, self.version)["logits"]

    def _labels(self, images: np.ndarray) -> np.ndarray:
        # only the label map crosses the network: C times less than the logits
        return self.client.infer(self.model, {"images": images}, {"labels": True}, self.version)["labels"]

    def _segment_frames(self, frames: np.ndarray) -> np.ndarray:
        """uint8 frames -> label maps, normalised on the server (4x less to send than floats)."""
        return self.client.infer(self.model, {"frames": frames}, {"labels": True}, self.version)["labels"]
