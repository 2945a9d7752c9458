"""A real S3 HTTP endpoint on 127.0.0.1 for the tests: moto's S3 server.

moto (5.x) serves presigned GETs without checking their signature or their
expiry: its S3 responses only compare Content-* query values with the
request's headers. Real S3 and its clones refuse both, and the tests must
prove that a tampered or expired URL is refused, so :class:`PresignedUrlCheck`
sits in front of moto's WSGI app and checks anonymous SigV4 query-signed
requests the way S3 does, with botocore's own SigV4 code and the known test
credentials. It refuses SigV2 presigned URLs outright, so the service must
presign with SigV4, and refuses SDK requests whose access key id it does not
know (without checking their signature). Everything else reaches moto unchanged.
"""

from __future__ import annotations

import threading
import time
from calendar import timegm
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

ACCESS_KEY = "AKIATESTSUITE0000001"
SECRET_KEY = "test-suite-secret-key"
REGION = "us-east-1"


def _error(start_response, code: str, message: str):
    body = f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body.encode()]


class PresignedUrlCheck:
    """WSGI middleware: refuses presigned requests with a wrong signature or past their expiry."""

    def __init__(self, app, secrets: dict[str, str], clock=time.time):
        self.app = app
        self.secrets = secrets
        self.clock = clock

    def __call__(self, environ, start_response):
        query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        authorization = environ.get("HTTP_AUTHORIZATION")
        if authorization:
            # moto accepts any access key; S3 refuses unknown ones (the header's signature is not checked here).
            key = authorization.partition("Credential=")[2].partition("/")[0]
            if key not in self.secrets:
                return _error(start_response, "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
        else:
            if "Signature" in query:
                return _error(start_response, "AccessDenied", "SigV2 presigned URLs are not accepted")
            if "X-Amz-Signature" in query:
                problem = self._check(environ, query)
                if problem:
                    return _error(start_response, *problem)
        return self.app(environ, start_response)

    def _check(self, environ, query: dict[str, str]) -> tuple[str, str] | None:
        try:
            key, _, region, service, _ = query["X-Amz-Credential"].split("/")
            signed_at = timegm(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ"))
            expires = int(query["X-Amz-Expires"])
        except (KeyError, ValueError):
            return "AuthorizationQueryParametersError", "malformed presigned URL"
        if key not in self.secrets:
            return "InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records."
        if self.clock() > signed_at + expires:
            return "AccessDenied", "Request has expired"
        # Recompute the signature over the request as received, minus the signature itself.
        uri = environ.get("REQUEST_URI") or environ["PATH_INFO"]
        parts = urlsplit(f"http://{environ['HTTP_HOST']}{uri}")
        rest = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
        request = AWSRequest(
            method=environ["REQUEST_METHOD"],
            url=parts._replace(query=urlencode(rest, quote_via=quote)).geturl(),
            headers={"host": environ["HTTP_HOST"]},
        )
        request.context["timestamp"] = query["X-Amz-Date"]
        auth = S3SigV4QueryAuth(Credentials(key, self.secrets[key]), service, region, expires=expires)
        expected = auth.signature(auth.string_to_sign(request, auth.canonical_request(request)), request)
        if expected != query["X-Amz-Signature"]:
            return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
        return None


class S3Endpoint:
    """moto's S3 server (the WSGI app and request handler its ThreadedMotoServer runs)
    on 127.0.0.1 at a free port, behind :class:`PresignedUrlCheck`. Records requests by method and path."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []
        self.clock_offset_s = 0.0  # moves the endpoint's clock, to expire presigned URLs without waiting
        checked = PresignedUrlCheck(
            DomainDispatcherApplication(create_backend_app),
            {ACCESS_KEY: SECRET_KEY},
            clock=lambda: time.time() + self.clock_offset_s,
        )

        def app(environ, start_response):
            self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"]))
            return checked(environ, start_response)

        self._server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(timeout=10)

    @property
    def storage_options(self) -> dict:
        """fsspec (s3fs) options for this endpoint, as a config would give them."""
        return {"endpoint_url": self.url, "key": ACCESS_KEY, "secret": SECRET_KEY, "client_kwargs": {"region_name": REGION}}

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY, region_name=REGION
        )

    def upload_dir(self, local_dir, bucket: str, prefix: str, skip: tuple[str, ...] = ()) -> None:
        client = self.client()
        for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(local_dir).as_posix()
            if not rel.startswith(skip):
                client.upload_file(str(path), bucket, f"{prefix}/{rel}")

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
