"""A small HTTP client for the Quantyard API, used by the CLI's client commands."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx

FINAL_STATUSES = {"succeeded", "failed", "cancelled"}
MAX_PAGE = 500  # the largest `limit` GET /v1/artifacts accepts


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


def _query_value(value: Any) -> Any:
    """Booleans as the server's query parser reads them ("true"/"false", not "True")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


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

    def upload_source(self, archive: Path, *, name: str, base_model: str | None = None,
                      on_bytes: Callable[[int], None] | None = None) -> dict:
        """``base_model``: the Hugging Face repo id ("org/name" or its huggingface.co URL) the
        upload was taken from; model cards and ML-BOMs then name it instead of ``name``."""
        size = archive.stat().st_size

        def chunks() -> Iterator[bytes]:
            with archive.open("rb") as f:
                while block := f.read(1 << 20):
                    if on_bytes:
                        on_bytes(len(block))
                    yield block

        headers = {"Content-Type": _content_type(archive), "Content-Length": str(size)}
        params = {"name": name, **({"base_model": base_model} if base_model else {})}
        return self._request("POST", "/v1/sources", params=params, content=chunks(),
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
        """One page of GET /v1/artifacts: {"items", "next_cursor"}. ``filters`` are its query
        parameters (format, quantization, architecture, source, label=[...], min_size, ..., q,
        sort, limit, cursor, include_withdrawn, include_deleted); None values are left out."""
        params = {k: _query_value(v) for k, v in filters.items() if v is not None and v != []}
        return self._request("GET", "/v1/artifacts", params=params).json()

    def artifact_pages(self, *, limit: int | None = None, page_size: int = MAX_PAGE,
                       **filters: Any) -> Iterator[dict]:
        """The pages of a search, following ``next_cursor`` until the last page or until
        ``limit`` artifacts (None: all). Each request asks for no more than is still wanted,
        so the last page's ``next_cursor`` points just past the last artifact returned."""
        remaining = limit
        while remaining is None or remaining > 0:
            want = page_size if remaining is None else min(page_size, remaining)
            page = self.list_artifacts(**filters, limit=want)
            yield page
            if remaining is not None:
                remaining -= len(page["items"])
            if not page.get("next_cursor") or not page["items"]:
                return
            filters["cursor"] = page["next_cursor"]

    def iter_artifacts(self, *, limit: int | None = None, **filters: Any) -> Iterator[dict]:
        """Every artifact of a search (at most ``limit``), across pages."""
        for page in self.artifact_pages(limit=limit, **filters):
            yield from page["items"]

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

    def reinstate(self, kind: str, node_id: str, *, reason: str) -> dict:
        """Undo the withdrawal of a source or an artifact (admins); returns what was reinstated and
        what stays withdrawn because it still comes from another withdrawn node."""
        return self._request("POST", f"/v1/{kind}s/{node_id}/reinstate", json={"reason": reason}).json()

    # Retention (maintainers; lifting a legal hold: admins). Each returns the artifact as the
    # server now has it (deleting also lists ``derived_artifacts``, which stay available).

    def delete_artifact(self, artifact_id: str, *, reason: str | None = None) -> dict:
        """Soft delete: hidden from listings, downloads refused, restorable until its purge_after."""
        body = {"reason": reason} if reason else None
        return self._request("DELETE", f"/v1/artifacts/{artifact_id}", json=body).json()

    def restore_artifact(self, artifact_id: str) -> dict:
        return self._request("POST", f"/v1/artifacts/{artifact_id}/restore").json()

    def set_legal_hold(self, artifact_id: str, *, reason: str) -> dict:
        return self._request("PUT", f"/v1/artifacts/{artifact_id}/legal-hold", json={"reason": reason}).json()

    def release_legal_hold(self, artifact_id: str, *, reason: str | None = None) -> dict:
        body = {"reason": reason} if reason else None
        return self._request("DELETE", f"/v1/artifacts/{artifact_id}/legal-hold", json=body).json()

    def lineage(self, kind: str, node_id: str, *, direction: str = "both", depth: int | None = None) -> dict:
        params: dict[str, Any] = {"direction": direction}
        if depth is not None:
            params["depth"] = depth
        return self._request("GET", f"/v1/{kind}s/{node_id}/lineage", params=params).json()

    def frontier(self, source_id: str, *, loss: str = "mean_kl") -> dict:
        """Every artifact of a source with size, bits per weight, KL, PPL ratio, speed and its
        Pareto flag (GET /v1/sources/{id}/frontier)."""
        return self._request("GET", f"/v1/sources/{source_id}/frontier", params={"loss": loss}).json()
