"""Fixtures for tier tests: S3 (moto) and GCS (fake-gcs-server) behind fault proxies.

Import these names into a test module (``from conftest_tiers import *``). Each
``remote`` is ``(url, storage_options, proxy)`` for a fresh bucket; the options are
passed explicitly so that writer and promotion processes (spawned, possibly before
the servers started) reach the same server.
"""
from __future__ import annotations

import itertools

import pytest

from servers import FakeGCS, FaultProxy, MotoS3, tier_env

tier_env()
_n = itertools.count()


@pytest.fixture(scope="session")
def s3_server():
    server = MotoS3().start()
    proxy = FaultProxy(server.port).start()
    yield proxy
    proxy.stop()
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    server = FakeGCS().start()
    proxy = FaultProxy(server.port).start()
    yield proxy
    proxy.stop()
    server.stop()


def s3_options(proxy: FaultProxy) -> dict:
    return {"endpoint_url": proxy.url, "key": "testing", "secret": "testing",
            "config_kwargs": {"retries": {"max_attempts": 1}}}


def gcs_options(proxy: FaultProxy) -> dict:
    return {"endpoint_url": proxy.url, "token": "anon", "project": "test", "retries": 1}


def _bucket(kind: str, proxy: FaultProxy) -> tuple[str, dict]:
    import fsspec

    name = f"ckpt-{kind}-{next(_n)}"
    opts = s3_options(proxy) if kind == "s3" else gcs_options(proxy)
    fs = fsspec.filesystem(kind, skip_instance_cache=True, **opts)
    fs.mkdir(name)
    return f"{kind}://{name}/run", opts


@pytest.fixture
def s3_remote(s3_server):
    url, opts = _bucket("s3", s3_server)
    yield url, opts, s3_server
    s3_server.clear()


@pytest.fixture
def gcs_remote(gcs_server):
    url, opts = _bucket("gs", gcs_server)
    yield url, opts, gcs_server
    gcs_server.clear()


@pytest.fixture(params=["s3", "gs"])
def remote(request):
    """Each test using it runs against S3 and GCS."""
    fixture = "s3_remote" if request.param == "s3" else "gcs_remote"
    return request.getfixturevalue(fixture)


# One bucket per emulator for a test module (a client and a bucket per test would cost
# a second each); each test takes a fresh prefix in it.
@pytest.fixture(scope="module")
def s3_bucket(s3_server):
    return _bucket("s3", s3_server)


@pytest.fixture(scope="module")
def gcs_bucket(gcs_server):
    return _bucket("gs", gcs_server)


__all__ = ["s3_server", "s3_bucket", "gcs_bucket", "gcs_server", "s3_remote", "gcs_remote", "remote", "s3_options",
           "gcs_options"]
