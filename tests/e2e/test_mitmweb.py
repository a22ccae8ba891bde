"""Interactive use: mitmweb with the addon, driven through its REST API as the UI does."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.utils.emoji import emoji

from scripts.harness import MitmdumpConfig, Service, start_mitmweb, start_receiver
from tests.e2e.conftest import Keys, fetch, read_jsonl

pytestmark = pytest.mark.e2e


class WebClient:
    """The REST calls the web UI makes: a bearer token on every request, and for POSTs the
    double-submit XSRF pair (a cookie and the same value in a header), as the UI sends."""

    XSRF = "fp-tap-e2e-xsrf"

    def __init__(self, url: str, token: str) -> None:
        self.url, self.token = url, token
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, path: str, data: bytes | None = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        if data is not None:
            headers |= {
                "Cookie": f"_mitmproxy_xsrf={self.XSRF}",
                "X-XSRFToken": self.XSRF,
                "Content-Type": "application/json",
            }
        request = urllib.request.Request(self.url + path, data=data, headers=headers)
        with self.opener.open(request, timeout=30) as response:
            return json.loads(response.read())

    def get(self, path: str) -> Any:
        return self._call(path)

    def command(self, name: str, *arguments: str) -> Any:
        reply = self._call(f"/commands/{name}", json.dumps({"arguments": list(arguments)}).encode())
        assert "error" not in reply, reply
        return reply["value"]


def test_content_view_comments_marks_and_commands(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    web, url, token = start_mitmweb(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={"fp_keys_file": str(keys.file)},
        ),
    )
    try:
        proxy = f"http://127.0.0.1:{web.port}"
        for query in (
            "case=ok&api=v4",
            "case=bad_bot&api=v3&encoding=gzip",
            "case=wrong_key",
            "case=html",
        ):
            assert fetch(f"{proxy}/agent?{query}").status == 200
        client = WebClient(url, token)
        flows = wait_for_flows(client, 4, annotated=3)
        by_comment = {f["comment"].split(" ")[1] if f["comment"] else "": f for f in flows}
        assert set(by_comment) == {"trusted", "suspicious", "error:", ""}
        assert by_comment["trusted"]["marked"] == ""
        # The web API shows markers as the emoji they name.
        assert by_comment["suspicious"]["marked"] == emoji[":warning:"]
        assert by_comment["error:"]["marked"] == emoji[":x:"]
        assert by_comment[""]["marked"] == ""  # ordinary traffic is left alone

        # The fingerprint view is picked automatically and shows the unsealed event.
        flow_id = by_comment["suspicious"]["id"]
        view = client.get(f"/flows/{flow_id}/response/content/auto.json")
        assert view["view_name"] == "fingerprint"
        assert "verdict: suspicious (bad_bot)" in view["text"]
        event = json.loads(view["text"].split("\n", 4)[-1])
        assert event["products"]["botd"]["data"]["bot"]["result"] == "bad"
        html = client.get(f"/flows/{by_comment['']['id']}/response/content/auto.json")
        assert html["view_name"] != "fingerprint"

        # The worker process reports its counters at most every 0.1 s.
        deadline = time.monotonic() + 10
        while (stats := json.loads(client.command("fp.stats"))).get("open_responses") != 3:
            assert time.monotonic() < deadline, stats
            time.sleep(0.05)
        assert (stats["open_responses"], stats["unsealed"]) == (3, 2)
        assert stats["errors"] == {"decrypt_failed": 1}

        # Here the record lines go through logging, to the UI's event log (and to the
        # terminal): mitmweb's event log is a second reader of them.
        events = [e for e in client.get("/events") if "] fp v" in e["message"]]
        assert sorted(e["message"].split(" ")[4] for e in events) == [
            "error",
            "suspicious",
            "trusted",
        ]
        assert {e["level"] for e in events} == {"info", "warn"}
        assert sum(" fp v" in line for line in web.output().splitlines()) == 3

        out = tmp_path / "marked.jsonl"
        client.command("fp.export", "~marked", str(out))
        records = wait_for_lines(out, 2)
        assert sorted(r["verdict"] for r in records) == ["error", "suspicious"]
        assert out.stat().st_mode & 0o777 == 0o600
    finally:
        assert web.stop() == 0
    assert keys.key.to_base64() not in web.output()


def test_fp_resend_and_fp_discard_from_the_command_bar(
    tmp_path: Path, keys: Keys, endpoint: Service
) -> None:
    """Parked webhook events, sent again once the receiver takes them, or deleted."""
    gate, received = tmp_path / "gate", tmp_path / "received.jsonl"
    secret = {"FP_WEBHOOK_SECRET": "fp-tap-e2e-webhook-secret"}
    receiver, hook = start_receiver(
        tmp_path, log=received, args=["--gate", str(gate), "--closed", "fail"], env=secret
    )
    web, url, token = start_mitmweb(
        tmp_path,
        MitmdumpConfig(
            mode=f"reverse:http://127.0.0.1:{endpoint.port}",
            options={
                "fp_keys_file": str(keys.file),
                "fp_webhook_url": hook,
                "fp_state_dir": str(tmp_path / "state"),
                "fp_webhook_give_up": 1,
                "fp_webhook_retry_ms": 200,
                "fp_webhook_retry_max": 1,
            },
            env=secret,
        ),
    )
    try:
        client = WebClient(url, token)

        def stats_reach(want: dict[str, int]) -> dict[str, Any]:
            """Gauges (webhook_parked) and counters (webhook.sent) at these values."""
            deadline = time.monotonic() + 30
            while True:
                stats: dict[str, Any] = json.loads(client.command("fp.stats"))
                counts = stats.get("webhook", {})
                flat = {**stats, **{f"webhook.{k}": v for k, v in counts.items()}}
                if all(flat.get(name) == value for name, value in want.items()):
                    return stats
                assert time.monotonic() < deadline, f"{want}: {json.dumps(stats)}"
                time.sleep(0.1)

        def accepted() -> list[str]:
            return [r["request_id"] for r in read_jsonl(received) if r["status"] == 200]

        proxy = f"http://127.0.0.1:{web.port}"
        for seed in (1, 2):
            assert fetch(f"{proxy}/agent?case=ok&api=v4&seed={seed}").status == 200
        stats_reach({"webhook_parked": 2, "webhook.spooled": 2})
        assert accepted() == []
        gate.touch()
        client.command("fp.resend")
        stats_reach(
            {"webhook.resent": 2, "webhook.sent": 2, "webhook_pending": 0, "webhook_parked": 0}
        )
        assert len(set(accepted())) == 2

        gate.unlink()  # refusing again
        assert fetch(f"{proxy}/agent?case=ok&api=v3&seed=3").status == 200
        stats_reach({"webhook_parked": 1, "webhook.spooled": 3})
        client.command("fp.discard")
        stats_reach({"webhook.discarded": 1, "webhook_parked": 0, "webhook_pending": 0})
        gate.touch()
        client.command("fp.resend")  # nothing left to send
        time.sleep(1)
        assert len(accepted()) == 2
        assert "fp.discard: 1 parked webhook event(s) deleted" in web.output()
    finally:
        assert web.stop() == 0
        receiver.stop()


def wait_for_flows(client: WebClient, count: int, annotated: int = 0) -> list[dict[str, Any]]:
    """``count`` finished flows, ``annotated`` of them with a comment: the worker process's
    answer reaches the flow a moment after the response went to the client."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        flows: list[dict[str, Any]] = client.get("/flows")
        if (
            len(flows) >= count
            and all(f.get("response") for f in flows)
            and sum(bool(f.get("comment")) for f in flows) >= annotated
        ):
            return flows
        time.sleep(0.1)
    raise AssertionError(f"mitmweb did not show {count} finished flows ({annotated} annotated)")


def wait_for_lines(path: Path, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if path.exists():
            lines = path.read_text().splitlines()
            if len(lines) >= count:
                return [json.loads(x) for x in lines]
        time.sleep(0.1)
    raise AssertionError(f"{path.name} did not get {count} lines")
