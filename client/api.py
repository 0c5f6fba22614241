"""Submit API-format prompts to a running ComfyUI server and collect their outputs.

The standard library for ``POST /prompt``, ``GET /history/<id>``, ``GET /view``,
``GET /object_info``, ``GET /system_stats`` and ``POST /upload/image``; progress is followed over
the ``/ws`` websocket when ``websocket-client`` is installed (polling otherwise).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

__all__ = ["ComfyClient", "ComfyError", "PromptResult"]


class ComfyError(RuntimeError):
    """The server refused a prompt or a node failed; ``details`` holds the server's JSON."""

    def __init__(self, message: str, details: Any = None):
        super().__init__(message)
        self.details = details


@dataclass
class PromptResult:
    prompt_id: str
    history: dict
    images: list[dict] = field(default_factory=list)  # {"filename", "subfolder", "type", "node"}


class ComfyClient:
    def __init__(self, url: str = "http://127.0.0.1:8188", timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    # -- plumbing ------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, raw: bool = False):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            try:
                details = json.loads(text)
            except ValueError:
                details = text
            raise ComfyError(f"{path}: HTTP {exc.code}: {_summarize(details)}", details) from None
        return payload if raw else json.loads(payload)

    def get(self, path: str):
        return self._request(path)

    def system_stats(self) -> dict:
        return self.get("/system_stats")

    def queue(self) -> dict:
        """``{"queue_running": [...], "queue_pending": [...]}``; an item's second entry is its prompt id."""
        return self.get("/queue")

    def interrupt(self, prompt_id: str | None = None) -> None:
        """Interrupt the running prompt; with ``prompt_id``, only if that prompt is the one running."""
        self._request("/interrupt", {"prompt_id": prompt_id} if prompt_id else {}, raw=True)

    def delete_queued(self, *prompt_ids: str) -> None:
        """Remove prompts that wait in the queue (a running one is not affected)."""
        self._request("/queue", {"delete": list(prompt_ids)}, raw=True)

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""))

    # -- prompts -------------------------------------------------------------------------------
    def submit(self, prompt: dict) -> str:
        """Queue an API-format prompt; returns its id.  Validation errors raise :class:`ComfyError`."""
        reply = self._request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if reply.get("node_errors"):
            raise ComfyError(f"prompt rejected: {_summarize(reply)}", reply)
        return reply["prompt_id"]

    def wait(self, prompt_id: str, timeout: float | None = None, poll: float = 0.1) -> PromptResult:
        """Wait for ``prompt_id`` to finish; a failed execution raises :class:`ComfyError`."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                entry["status"].get("completed") or entry["status"].get("status_str") == "error"
            ):
                status = entry["status"]
                if status.get("status_str") == "error":
                    raise ComfyError(f"prompt {prompt_id} failed: {_execution_error(status)}", entry)
                images = []
                for node_id, out in entry.get("outputs", {}).items():
                    for img in out.get("images", []):
                        images.append({**img, "node": node_id})
                return PromptResult(prompt_id, entry, images)
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout or self.timeout} s")

    def run(self, prompt: dict, timeout: float | None = None,
            on_event: Callable[[str, dict], None] | None = None) -> PromptResult:
        """Submit ``prompt`` and wait for it.  With ``on_event``, the server's websocket messages
        for this prompt (``execution_start``, ``executing``, ``progress``, ``executed``,
        ``execution_cached``, ``execution_error``, ...) are passed to ``on_event(type, data)``."""
        if on_event is None:
            return self.wait(self.submit(prompt), timeout)
        try:
            import websocket  # websocket-client
        except ImportError:
            return self.wait(self.submit(prompt), timeout)
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        limit = timeout or self.timeout
        ws = websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=limit)
        try:
            prompt_id = self.submit(prompt)
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                message = ws.recv()
                if not isinstance(message, str):
                    continue  # binary previews
                event = json.loads(message)
                kind, data = event.get("type", ""), event.get("data") or {}
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                on_event(kind, data)
                if kind in ("execution_success", "execution_error", "execution_interrupted") or (
                    kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id
                ):
                    break
        finally:
            ws.close()
        return self.wait(prompt_id, timeout)

    def upload_image(self, path: str, name: str | None = None, overwrite: bool = True) -> str:
        """Upload an image into the server's input folder; returns the name to use in LoadImage."""
        import mimetypes
        from pathlib import Path

        data = Path(path).read_bytes()
        name = name or Path(path).name
        boundary = uuid.uuid4().hex
        mime = mimetypes.guess_type(name)[0] or "application/octet-stream"
        body = (
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            f"Content-Type: {mime}\r\n\r\n"
        ).encode() + data + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"overwrite\"\r\n\r\n"
            f"{'true' if overwrite else 'false'}\r\n--{boundary}--\r\n"
        ).encode()
        req = urllib.request.Request(self.url + "/upload/image", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise ComfyError(f"/upload/image: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}") from None
        return reply["name"] if not reply.get("subfolder") else f"{reply['subfolder']}/{reply['name']}"

    def view(self, image: dict) -> bytes:
        """The bytes of an output file (an entry of :attr:`PromptResult.images`)."""
        query = urllib.parse.urlencode(
            {"filename": image["filename"], "subfolder": image.get("subfolder", ""), "type": image.get("type", "output")}
        )
        return self._request(f"/view?{query}", raw=True)


def _execution_error(status: dict) -> str:
    for kind, msg in status.get("messages", []):
        if kind == "execution_error":
            return f"node {msg.get('node_id')} ({msg.get('node_type')}): {msg.get('exception_message', '').strip()}"
    return json.dumps(status)[:2000]


def _summarize(details: Any) -> str:
    if isinstance(details, dict):
        parts = []
        err = details.get("error")
        if isinstance(err, dict):
            parts.append(f"{err.get('message', '')} {err.get('details', '')}".strip())
        for node_id, ne in (details.get("node_errors") or {}).items():
            for e in ne.get("errors", []):
                parts.append(f"node {node_id} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        if parts:
            return "; ".join(parts)
    return str(details)[:2000]
