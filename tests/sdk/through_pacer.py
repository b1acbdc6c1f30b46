#!/usr/bin/env python3
"""Drive the official Genesys Cloud Python SDK (PyPI `purecloudplatformclientv2`) through
pacer, changing nothing but the SDK's base URL.

Used by tests/sdk.rs; runnable by hand too:

    python3 tests/sdk/through_pacer.py http://127.0.0.1:8080 CLIENT_ID CLIENT_SECRET plain

Arguments (each falls back to an environment variable):
    base_url       PACER_URL          pacer's base URL, e.g. http://127.0.0.1:8080
    client_id      GENESYS_CLIENT_ID
    client_secret  GENESYS_CLIENT_SECRET
    mode           SDK_MODE           "plain" (default) or "retry"
    --calls N      SDK_CALLS          API calls to make (default 3 plain, 12 retry)

What the SDK does on its own (PureCloudPlatformClientV2 269.0.0, urllib3 2.x):
  * login host: ApiClient.get_conf_url("login", host) replaces `//api.` by `//login.` in
    the host (api_client.py:112; used for /oauth/token at :162); `ApiClient()` copies
    Configuration().host when built (:87). `http://127.0.0.1:PORT` has no `//api.`, so
    the client-credentials POST goes to `http://127.0.0.1:PORT/oauth/token` - pacer's
    `/oauth/` route. API calls go to `<host>/api/v2/...`.
  * retries: rest.py:112-116, RESTClientObject.__init__, builds `urllib3.util.Retry()` (defaults:
    total=10, no status_forcelist, respect_retry_after_header=True) with allowed_methods
    set to every method, and hands it to the PoolManager. urllib3's Retry.is_retry
    retries 413/429/503 *when the answer carries Retry-After* (urllib3/util/retry.py
    is_retry; connectionpool.py urlopen), sleeping exactly Retry-After (Retry.sleep ->
    sleep_for_retry), then raises MaxRetryError (not ApiException) once 10 are used up.
    A 429 without Retry-After is not retried at all. Nothing needs enabling; this script
    only observes those sleeps (a wrapper around Retry.sleep that records and then calls
    the original) and never changes the retry policy.

Output: the last stdout line is `PACER_SDK_SUMMARY {json}`; the exit code is 0 when every
call succeeded, 1 otherwise, 2 when the SDK is not installed.
"""

import argparse
import json
import os
import sys
import threading
import time

SUMMARY_TAG = "PACER_SDK_SUMMARY"


def emit(summary):
    sys.stdout.write(SUMMARY_TAG + " " + json.dumps(summary, sort_keys=True) + "\n")
    sys.stdout.flush()


def parse_args():
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base_url", nargs="?", default=env("PACER_URL"))
    p.add_argument("client_id", nargs="?", default=env("GENESYS_CLIENT_ID"))
    p.add_argument("client_secret", nargs="?", default=env("GENESYS_CLIENT_SECRET"))
    p.add_argument("mode", nargs="?", default=env("SDK_MODE", "plain"),
                   choices=["plain", "retry"])
    p.add_argument("--calls", type=int, default=env("SDK_CALLS"))
    args = p.parse_args()
    for name in ("base_url", "client_id", "client_secret"):
        if not getattr(args, name):
            p.error("missing " + name)
    if args.calls is None:
        args.calls = 3 if args.mode == "plain" else 12
    args.calls = int(args.calls)
    return args


class RetryObserver(object):
    """Records every sleep urllib3's Retry takes before re-sending a request."""

    def __init__(self, retry_cls):
        self.lock = threading.Lock()
        self.retries = 0
        self.statuses = {}
        self.retry_after = []  # seconds the server asked for, per retry
        self.slept = 0.0  # seconds actually spent in Retry.sleep
        self.origin = time.monotonic()
        self.sleeps = []  # [offset of the sleep's start, seconds slept]
        original = retry_cls.sleep
        observer = self

        def observed_sleep(retry, response=None):
            asked = None
            if response is not None:
                try:
                    asked = retry.get_retry_after(response)
                except Exception:  # an unparsable header: urllib3 decides, we just record
                    asked = None
            started = time.monotonic()
            try:
                return original(retry, response)
            finally:
                with observer.lock:
                    observer.retries += 1
                    status = str(getattr(response, "status", None))
                    observer.statuses[status] = observer.statuses.get(status, 0) + 1
                    observer.retry_after.append(asked)
                    took = time.monotonic() - started
                    observer.slept += took
                    observer.sleeps.append([round(started - observer.origin, 3), round(took, 3)])

        retry_cls.sleep = observed_sleep

    def snapshot(self):
        with self.lock:
            return {
                "retries": self.retries,
                "retry_statuses": dict(self.statuses),
                "retry_after": list(self.retry_after),
                "retry_after_total": sum(a for a in self.retry_after if a),
                "slept": round(self.slept, 3),
                "sleeps": [list(x) for x in self.sleeps],
            }


def describe_exception(e):
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    return {
        "type": type(e).__name__,
        "status": status if isinstance(status, int) else None,
        "reason": str(reason if reason is not None else e)[:300],
    }


def main():
    args = parse_args()
    summary = {
        "mode": args.mode,
        "base_url": args.base_url,
        "calls": 0,
        "ok": 0,
        "exceptions": [],
    }
    try:
        import urllib3
        import PureCloudPlatformClientV2
        from PureCloudPlatformClientV2.rest import ApiException
    except ImportError as e:
        summary["error"] = "SDK not installed: %s (pip install purecloudplatformclientv2)" % e
        emit(summary)
        return 2

    observer = RetryObserver(urllib3.util.Retry)
    try:
        from importlib.metadata import version
        summary["sdk_version"] = version("purecloudplatformclientv2")
    except Exception:
        summary["sdk_version"] = None
    summary["urllib3_version"] = urllib3.__version__

    # The one change an SDK user makes: the base URL. Set before the ApiClient exists,
    # since ApiClient() copies Configuration().host.
    PureCloudPlatformClientV2.configuration.host = args.base_url
    api_client = PureCloudPlatformClientV2.api_client.ApiClient()
    summary["login_url"] = api_client.get_conf_url("login", api_client.host) + "/oauth/token"
    summary["api_url"] = api_client.get_conf_url("api", api_client.host) + "/api/v2/tokens/me"

    # The retry policy the SDK installed by itself (read, not changed).
    try:
        pool = api_client.get_http_client().rest_client.pool_manager
        r = pool.connection_pool_kw.get("retries")
        summary["sdk_retry"] = {
            "total": r.total,
            "status_forcelist": sorted(r.status_forcelist or []),
            "respect_retry_after_header": r.respect_retry_after_header,
            "retry_after_status_codes": sorted(r.RETRY_AFTER_STATUS_CODES),
            "allowed_methods": sorted(r.allowed_methods or []),
            "backoff_factor": r.backoff_factor,
        }
    except Exception as e:
        summary["sdk_retry"] = {"error": repr(e)}

    started = time.monotonic()
    observer.origin = started
    try:
        api_client.get_client_credentials_token(args.client_id, args.client_secret)
        summary["login"] = bool(api_client.access_token)
    except Exception as e:
        summary["login"] = False
        summary["login_error"] = describe_exception(e)
    summary["login_seconds"] = round(time.monotonic() - started, 3)

    if summary["login"]:
        tokens = PureCloudPlatformClientV2.TokensApi(api_client)
        users = PureCloudPlatformClientV2.UsersApi(api_client)
        timeline = summary["timeline"] = []  # [start, end] offsets of each call
        for i in range(args.calls):
            summary["calls"] += 1
            call_started = time.monotonic()
            try:
                if args.mode == "plain" and i == args.calls - 1 and args.calls > 1:
                    # A second, list-shaped API: GET /api/v2/users -> UserEntityListing.
                    listing = users.get_users(page_size=1)
                    summary["users_type"] = type(listing).__name__
                else:
                    info = tokens.get_tokens_me()
                    summary["token_client_id"] = info.o_auth_client.id if info.o_auth_client else None
                    summary["token_client_name"] = info.o_auth_client.name if info.o_auth_client else None
                    summary["org_id"] = info.organization.id if info.organization else None
                summary["ok"] += 1
            except ApiException as e:
                summary["exceptions"].append(dict(describe_exception(e), call=i))
            except Exception as e:  # urllib3.exceptions.MaxRetryError after 10 retries, ...
                summary["exceptions"].append(dict(describe_exception(e), call=i))
            timeline.append([round(call_started - started, 3),
                             round(time.monotonic() - started, 3)])

    summary["elapsed"] = round(time.monotonic() - started, 3)
    summary.update(observer.snapshot())
    emit(summary)
    return 0 if summary["login"] and summary["ok"] == summary["calls"] else 1


if __name__ == "__main__":
    sys.exit(main())
