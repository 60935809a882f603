"""The API's Python client (sync httpx), used by the CLI and by scripts."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import httpx

from kasou.errors import AgentUnavailable, KasouError, OperationTimeout
from kasou.wire import raise_for_response

if TYPE_CHECKING:  # httpx_ws is imported by the commands that open a websocket only (a console): 50 ms less
    from httpx_ws import WebSocketSession


class Client:
    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        http: httpx.Client | None = None,
        timeout: float = 30.0,
        verify: ssl.SSLContext | bool = True,
    ):
        """``verify``: what an https server is checked with (:func:`kasou.pki.trust`: the site CA)."""
        self.base_url = base_url
        self._http = http or httpx.Client(base_url=base_url, timeout=timeout, verify=verify)
        self._http.headers["Authorization"] = f"Bearer {token}"

    def _call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.TimeoutException:
            raise OperationTimeout(f"the kasou API at {self.base_url} did not answer in time") from None
        except httpx.TransportError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e) or "WRONG_VERSION_NUMBER" in str(e):
                raise AgentUnavailable(
                    f"the kasou API at {self.base_url} failed the TLS check ({e}); "
                    "is KASOU_CA the site CA and KASOU_API https://?"
                ) from None
            raise AgentUnavailable(f"the kasou API at {self.base_url} is not reachable; is kasou up?") from None
        raise_for_response(resp)
        return resp

    def get(self, path: str, **kw: Any) -> Any:
        return _json(self._call("GET", path, **kw))

    def post(self, path: str, **kw: Any) -> Any:
        return _json(self._call("POST", path, **kw))

    def put(self, path: str, **kw: Any) -> Any:
        return _json(self._call("PUT", path, **kw))

    def patch(self, path: str, **kw: Any) -> Any:
        return _json(self._call("PATCH", path, **kw))

    def delete(self, path: str, **kw: Any) -> Any:
        return _json(self._call("DELETE", path, **kw))

    def post_bytes(self, path: str, **kw: Any) -> bytes:
        """A POST whose answer is a file (application/octet-stream)."""
        return self._call("POST", path, **kw).content

    def download(self, path: str, dest: Any, **kw: Any) -> int:
        """A GET whose answer is a file, streamed into ``dest`` (an open binary file); the bytes written."""
        n = 0
        try:
            with self._http.stream("GET", path, **kw) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise_for_response(resp)
                for chunk in resp.iter_bytes():
                    dest.write(chunk)
                    n += len(chunk)
        except httpx.TransportError:
            raise AgentUnavailable(f"the kasou API at {self.base_url} is not reachable; is kasou up?") from None
        return n

    def text(self, path: str, **kw: Any) -> str:
        return self._call("GET", path, **kw).text

    def websocket(self, path: str) -> AbstractContextManager[WebSocketSession]:
        """A websocket to the API (``path`` as a console ticket names it), with this client's token and TLS."""
        from httpx_ws import connect_ws

        return connect_ws(path, self._http, max_message_size_bytes=1024 * 1024)

    def wait_job(
        self,
        job_id: str,
        timeout: float = 600.0,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        interval: float = 0.1,
    ) -> dict[str, Any]:
        """Follow a job to its end; raise its error if it failed."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/v1/jobs/{job_id}")
            if on_progress is not None:
                on_progress(job)
            if job["state"] == "succeeded":
                return dict(job)
            if job["state"] == "failed":
                from kasou.errors import from_dict

                raise from_dict(job.get("error") or {"message": f"job {job_id} failed"})
            if time.monotonic() > deadline:
                raise OperationTimeout(f"job {job_id} ({job['kind']}) did not finish within {timeout:.0f} s")
            time.sleep(interval)

    def close(self) -> None:
        self._http.close()


__all__ = ["Client", "KasouError"]


def _json(resp: httpx.Response) -> Any:
    """The answer's JSON; None for an answer with no body (204)."""
    return resp.json() if resp.content else None
