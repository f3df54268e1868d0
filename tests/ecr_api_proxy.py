"""A pass-through HTTP proxy in front of moto's ECR API: the one seam for what moto cannot do.

It forwards every call to moto untouched, counts calls per operation (the truth from the wire,
not from our code), and on request answers an operation with ECR's own error instead
(ThrottlingException, AccessDeniedException, ...) in the awsJson1_1 shape botocore parses, or
rewrites GetAuthorizationToken's ``expiresAt`` (moto sends a fixed date in 2015; real ECR sends
now + 12 h).
"""

from __future__ import annotations

import collections
import http.client
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

# The errors exactly as ECR words them.
THROTTLING = (400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
ACCESS_DENIED = (
    400,
    {
        "__type": "AccessDeniedException",
        "Message": "User: arn:aws:iam::123456789012:user/ci is not authorized to perform: ecr:DescribeRepositories "
        "on resource: arn:aws:ecr:us-east-1:123456789012:repository/* because no identity-based policy allows "
        "the ecr:DescribeRepositories action",
    },
)
SERVICE_UNAVAILABLE = (503, {"__type": "ServiceUnavailableException", "message": "Service Unavailable"})


class EcrApiProxy:
    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.calls: collections.Counter[str] = collections.Counter()
        self.faults: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.expires_in: float | None = None
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                operation = (self.headers.get("X-Amz-Target") or "").rpartition(".")[2]
                with proxy.lock:
                    proxy.calls[operation] += 1
                    fault = proxy.faults[operation].popleft() if proxy.faults[operation] else None
                if fault:
                    status, payload = fault
                    return self._send(status, json.dumps(payload).encode(), {"x-amzn-ErrorType": payload["__type"]})
                status, data, headers = proxy._forward(self.command, self.path, dict(self.headers), body)
                if operation == "GetAuthorizationToken" and status == 200 and proxy.expires_in is not None:
                    doc = json.loads(data)
                    for item in doc.get("authorizationData", []):
                        item["expiresAt"] = time.time() + proxy.expires_in
                    data = json.dumps(doc).encode()
                self._send(status, data, headers)

            def _send(self, status, data, headers):
                self.send_response(status)
                self.send_header("Content-Type", "application/x-amz-json-1.1")
                self.send_header("x-amzn-RequestId", headers.get("x-amzn-RequestId", str(uuid.uuid4())))
                for key in ("x-amzn-ErrorType",):
                    if key in headers:
                        self.send_header(key, headers[key])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def _forward(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            headers = {k: v for k, v in headers.items() if k.lower() not in {"host", "connection"}}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), {k: v for k, v in resp.getheaders()}
        finally:
            conn.close()

    def fail(self, operation: str, error: tuple[int, dict], times: int = 1) -> None:
        """Answer the next ``times`` calls of ``operation`` with ``error`` instead of moto."""
        with self.lock:
            self.faults[operation].extend([error] * times)

    def reset(self) -> None:
        with self.lock:
            self.calls.clear()
            self.faults.clear()
            self.expires_in = None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
