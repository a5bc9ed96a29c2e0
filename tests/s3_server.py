"""A real S3 API on a local port (moto's server) for tests of object-store run directories."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

KEY = "testing"  # moto accepts any access key and secret


@dataclass
class S3:
    endpoint: str  # host:port
    bucket: str

    def uri(self, key: str) -> str:
        """A pyarrow URI for `key` in the test bucket, with the endpoint in its options and the dummy credentials in
        it too, so Ray workers started before the server (without them in their environment) can use it."""
        return (f"s3://{KEY}:{KEY}@{self.bucket}/{key}?endpoint_override={self.endpoint}&scheme=http"
                "&region=us-east-1")


@contextmanager
def s3_server() -> Iterator[S3]:
    """Start moto's S3 server with one bucket; the dummy credentials also go into the environment, where pyarrow
    finds them for URIs without them."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=KEY)
    try:
        host, port = server.get_host_and_port()
        s3 = S3(endpoint=f"{host}:{port}", bucket=f"dce-{uuid.uuid4().hex[:8]}")
        pafs.S3FileSystem(endpoint_override=s3.endpoint, scheme="http", access_key=KEY, secret_key=KEY,
                          region="us-east-1", allow_bucket_creation=True).create_dir(s3.bucket)
        yield s3
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
