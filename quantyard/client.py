"""A small HTTP client for the Quantyard API, used by the CLI's client commands."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

FINAL_STATUSES = {"succeeded", "failed", "cancelled"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


def _content_type(path: Path) -> str:
    with path.open("rb") as f:
        head = f.read(4)
    if head[:2] == b"\x1f\x8b":
        return "application/gzip"
    if head[:4] == b"PK\x03\x04":
        return "application/zip"
    return "application/x-tar"


class QuantyardClient:
    def __init__(self, server: str, *, api_key: str | None = None, timeout: float = 60.0):
        """``api_key``: sent as ``Authorization: Bearer`` on every request (QUANTYARD_API_KEY)."""
        self.server = server.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.server, timeout=timeout, headers=headers)

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ApiError(0, "unreachable", f"cannot reach {self.server}: {exc}") from exc
        if response.status_code >= 400:
            try:
                err = response.json()["error"]
                raise ApiError(response.status_code, err["code"], err["message"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(response.status_code, "http_error", response.text[:500]) from None
        return response

    def upload_source(self, archive: Path, *, name: str,
                      on_bytes: Callable[[int], None] | None = None) -> dict:
        size = archive.stat().st_size

        def chunks() -> Iterator[bytes]:
            with archive.open("rb") as f:
                while block := f.read(1 << 20):
                    if on_bytes:
                        on_bytes(len(block))
                    yield block

        headers = {"Content-Type": _content_type(archive), "Content-Length": str(size)}
        return self._request("POST", "/v1/sources", params={"name": name}, content=chunks(),
                             headers=headers, timeout=None).json()

    def create_job(self, *, source: str, targets: list, hardware_class: str = "cpu",
                   labels: dict | None = None) -> dict:
        body = {"source": source, "targets": targets, "hardware_class": hardware_class,
                "labels": labels or {}}
        return self._request("POST", "/v1/jobs", json=body).json()

    def get_job(self, job_id: str) -> dict:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel_job(self, job_id: str) -> dict:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def list_artifacts(self, **filters: Any) -> dict:
        params = {k: v for k, v in filters.items() if v is not None}
        return self._request("GET", "/v1/artifacts", params=params).json()

    def get_artifact(self, artifact_id: str) -> dict:
        return self._request("GET", f"/v1/artifacts/{artifact_id}").json()

    def download(self, artifact_id: str, dest: Path, *, expected_sha256: str | None = None,
                 on_bytes: Callable[[int], None] | None = None, file: str | None = None) -> Path:
        """Stream an artifact (or its companion `file`) to `dest`; with `expected_sha256`,
        refuse bytes that don't match."""
        tmp = dest.with_name(dest.name + ".part")
        digest = hashlib.sha256()
        params = {"file": file} if file else None
        try:
            with self._http.stream("GET", f"/v1/artifacts/{artifact_id}/download", params=params,
                                   follow_redirects=True, timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self._request_error(response)
                with tmp.open("wb") as f:
                    for block in response.iter_bytes(1 << 20):
                        f.write(block)
                        digest.update(block)
                        if on_bytes:
                            on_bytes(len(block))
            if expected_sha256 and digest.hexdigest() != expected_sha256:
                raise ApiError(0, "checksum_mismatch",
                               f"downloaded bytes have sha256 {digest.hexdigest()}, "
                               f"the catalog says {expected_sha256}")
            tmp.replace(dest)
        finally:
            tmp.unlink(missing_ok=True)
        return dest

    @staticmethod
    def _request_error(response: httpx.Response) -> None:
        try:
            err = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(response.status_code, "http_error", response.text[:500]) from None
        raise ApiError(response.status_code, err["code"], err["message"])

    def wait(self, job_id: str, *, poll_s: float = 1.0,
             on_update: Callable[[dict], None] | None = None, timeout_s: float | None = None) -> dict:
        deadline = time.monotonic() + timeout_s if timeout_s else None
        while True:
            job = self.get_job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in FINAL_STATUSES:
                return job
            if deadline and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def get_card(self, artifact_id: str) -> str:
        """The artifact's model card (Markdown with YAML front matter)."""
        return self._request("GET", f"/v1/artifacts/{artifact_id}/card").text

    def get_bom(self, artifact_id: str) -> str:
        """The artifact's CycloneDX 1.6 ML-BOM, as the JSON text the server sent."""
        return self._request("GET", f"/v1/artifacts/{artifact_id}/bom").text

    def withdraw(self, kind: str, node_id: str, *, reason: str) -> dict:
        """Withdraw a source or an artifact (kind "source" | "artifact"); returns what was flagged."""
        return self._request("POST", f"/v1/{kind}s/{node_id}/withdraw", json={"reason": reason}).json()

    def lineage(self, kind: str, node_id: str, *, direction: str = "both", depth: int | None = None) -> dict:
        params: dict[str, Any] = {"direction": direction}
        if depth is not None:
            params["depth"] = depth
        return self._request("GET", f"/v1/{kind}s/{node_id}/lineage", params=params).json()
