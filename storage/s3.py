"""A repository on S3-compatible storage: s3://bucket/prefix.

Credentials, region and endpoint come from the standard AWS_* variables (AWS_ENDPOINT_URL points
at SeaweedFS, MinIO, ...). Transient failures (connection drops, throttling, 5xx) are retried with
backoff; anything else (access denied, no such bucket) fails at once with a clear message.
"""

from __future__ import annotations

import io
import os
from typing import Iterator
from urllib.parse import urlparse

import boto3
import boto3.exceptions
import botocore.config
import botocore.exceptions
from boto3.s3.transfer import TransferConfig
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from stasis.errors import FailedPrecondition, InvalidArgument, StasisError, Unavailable
from stasis.storage.backend import Backend, ObjectInfo, ObjectNotFound, check_key

# Packs (32 MiB) go up as single PUTs: multipart would buffer every part again in memory. Larger
# objects use multipart.
MULTIPART_THRESHOLD = 64 * 1024 * 1024
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                    "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "503", "500"}


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (botocore.exceptions.EndpointConnectionError,
                        botocore.exceptions.ConnectionClosedError,
                        botocore.exceptions.ReadTimeoutError,
                        botocore.exceptions.ConnectTimeoutError)):
        return True
    if isinstance(exc, botocore.exceptions.ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in _TRANSIENT_CODES or status >= 500
    return False


_retry = retry(retry=retry_if_exception(_transient), reraise=True,
               stop=stop_after_attempt(int(os.environ.get("STASIS_S3_ATTEMPTS", "5"))),
               wait=wait_exponential_jitter(multiplier=0.2, max=5))


class S3Backend(Backend):
    atomic_replace = True     # a PUT replaces an object as a whole
    conditional_put = False   # not relied upon until a startup probe proves it (SeaweedFS varies)

    def __init__(self, bucket: str, prefix: str = "", client=None):
        if not bucket:
            raise InvalidArgument("S3 repository URL needs a bucket: s3://bucket/prefix")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or boto3.session.Session().client(
            "s3", config=botocore.config.Config(
                retries={"total_max_attempts": 1},  # tenacity decides what is worth retrying
                max_pool_connections=32, connect_timeout=5, read_timeout=60,
                # Every stored object is hashed and (when encrypted) authenticated by the repository
                # itself; an extra CRC32 of each 32 MiB pack only costs CPU.
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
                s3={"addressing_style": "path"}))
        self.transfer = TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_THRESHOLD,
            max_concurrency=4, use_threads=True)

    @classmethod
    def from_url(cls, url: str) -> "S3Backend":
        parsed = urlparse(url)
        return cls(parsed.netloc, parsed.path)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, exc: Exception, key: str) -> StasisError:
        if isinstance(exc, botocore.exceptions.ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                return ObjectNotFound(f"object {key} is missing from {self.url}")
            if code == "NoSuchBucket" or (code == "AccessDenied" and not self._bucket_exists()):
                # Some servers (SeaweedFS) answer a write to a missing bucket with AccessDenied.
                return FailedPrecondition(f"bucket {self.bucket!r} does not exist; run 'stasis repo init {self.url}'")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return FailedPrecondition(f"S3 refused access to {self.url} ({code}); "
                                          f"check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            return StasisError(f"S3 error on {key} in {self.url}: {code}")
        if isinstance(exc, botocore.exceptions.NoCredentialsError):
            return FailedPrecondition(f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and "
                                      f"AWS_SECRET_ACCESS_KEY")
        if isinstance(exc, botocore.exceptions.BotoCoreError):
            return Unavailable(f"S3 endpoint for {self.url} is unreachable ({exc}); check AWS_ENDPOINT_URL")
        return StasisError(f"S3 error on {key}: {exc}")

    def bucket_exists(self) -> bool:
        return self._bucket_exists()

    def _bucket_exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return True
        except botocore.exceptions.ClientError as exc:
            return exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound")
        except botocore.exceptions.BotoCoreError:
            return True

    def ensure_bucket(self) -> None:
        try:
            self._head_bucket()
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
                raise self._fail(exc, "") from None
            try:
                self.client.create_bucket(Bucket=self.bucket)
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as err:
                raise self._fail(err, "") from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, "") from None

    @_retry
    def _head_bucket(self) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    @_retry
    def _put(self, key: str, data: bytes) -> None:
        if len(data) > MULTIPART_THRESHOLD:
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self.transfer)
        else:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    def save(self, key: str, data: bytes) -> None:
        try:
            self._put(self._key(key), data)
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError,
                boto3.exceptions.S3UploadFailedError) as exc:
            raise self._fail(exc, key) from None

    @_retry
    def _get(self, key: str, offset: int, length: int | None) -> bytes:
        kwargs = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if length == 0:
                return b""
            kwargs["Range"] = f"bytes={offset}-{end}"
        body = self.client.get_object(Bucket=self.bucket, Key=key, **kwargs)["Body"]
        try:
            return body.read()
        finally:
            body.close()

    def load(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        try:
            return self._get(self._key(key), offset, length)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""
            raise self._fail(exc, key) from None
        except botocore.exceptions.BotoCoreError as exc:
            raise self._fail(exc, key) from None

    @_retry
    def _head(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])

    def stat(self, key: str) -> ObjectInfo:
        try:
            return ObjectInfo(key, self._head(self._key(key)))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, key) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._key(prefix.rstrip("/")) + ("/" if prefix.endswith("/") else "") if prefix else (
            f"{self.prefix}/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], int(obj["Size"]))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, prefix) from None

    @_retry
    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def remove(self, key: str) -> None:
        self.stat(key)  # S3 deletes of absent keys succeed silently; the interface says NotFound
        try:
            self._delete(self._key(key))
        except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as exc:
            raise self._fail(exc, key) from None
