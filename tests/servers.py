"""Real protocol servers for tier tests, on 127.0.0.1: moto (S3), fake-gcs-server
(GCS), and the fault-injecting HTTP proxy that sits in front of either. They live
in ``fuzz/servers.py`` and ``fuzz/proxy.py``, shared with the fuzz harness.
"""
from fuzz.proxy import Fault, FaultProxy, free_port
from fuzz.servers import FakeGCS, MotoS3, tier_env, wait_port

__all__ = ["Fault", "FaultProxy", "free_port", "FakeGCS", "MotoS3", "tier_env", "wait_port"]
