"""A real S3 server for tests and the demo: SeaweedFS (`weed server`) on loopback only."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from stasis.testbed.ports import free_port


def weed_binary() -> str | None:
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    return here if os.path.exists(here) else shutil.which("weed")


class SeaweedFS:
    """Start with `start()`, stop with `stop()`; `env` holds the AWS_* variables that reach it."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "stasis-test",
                "AWS_SECRET_ACCESS_KEY": "stasis-test-secret", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self, timeout: float = 60.0) -> "SeaweedFS":
        weed = weed_binary()
        if weed is None:
            raise RuntimeError("SeaweedFS (weed) is not installed: run 'make provision'")
        os.makedirs(self.data_dir, exist_ok=True)
        # Every port named explicitly: weed opens more than the ones asked for (gRPC, Iceberg, Lance).
        p = {k: free_port() for k in ("s3", "s3g", "m", "mg", "v", "vg", "f", "fg", "metrics")}
        self.s3_port = p["s3"]
        argv = [weed, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3g']}", "-s3.port.iceberg=0",
                "-s3.port.lance=0", f"-master.port={p['m']}", f"-master.port.grpc={p['mg']}",
                f"-volume.port={p['v']}", f"-volume.port.grpc={p['vg']}", f"-filer.port={p['f']}",
                f"-filer.port.grpc={p['fg']}", f"-metricsPort={p['metrics']}", "-master.volumeSizeLimitMB=256",
                "-volume.max=0"]
        log = open(os.path.join(self.data_dir, "weed.log"), "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import boto3
        import botocore.config

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="x", aws_secret_access_key="x",
                              region_name="us-east-1",
                              config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=1))
        deadline = time.monotonic() + timeout
        bucket = "stasis-ready-probe"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited early; see {self.data_dir}/weed.log")
            try:
                client.create_bucket(Bucket=bucket)
                client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
                if client.get_object(Bucket=bucket, Key="probe")["Body"].read() == b"ok":
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not serve S3 within {timeout:.0f} s; see {self.data_dir}/weed.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
