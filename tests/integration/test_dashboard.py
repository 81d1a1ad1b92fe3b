"""Every query of the Grafana dashboard returns data from a real Prometheus scraping scep-fast."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from scep_fast.client import build_pkcs_req, parse_ca_certs
from tests.conftest import needs_peer
from tests.fake_webhook import FakeWebhook
from tests.integration.conftest import (
    CHALLENGE,
    Server,
    free_port,
    init_dir,
    set_config,
    start_server,
)
from tests.integration.load import fire, make_requests
from tests.integration.test_webhook_server import SECRET, configure_webhook

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "scep-fast.json"
PROMETHEUS = shutil.which("prometheus")
# Grafana's variables, given values that cover the short load below.
VARIABLES = {"$__rate_interval": "30s", "$__range": "5m"}


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"])
            for panel in dashboard["panels"] for target in panel["targets"]]


def test_dashboard_is_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "scep-fast-overview"
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Enrollments/s by outcome", "FAILURE by failInfo", "PKIOperation latency",
                   "Batch size", "Batch wait", "In-flight requests", "Ledger commit latency",
                   "Certificates issued/s", "CA certificate expires in",
                   "RA certificate expires in"):
        assert wanted in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    # Rates use Grafana's interval so that they work at every scrape interval.
    for _, expr in dashboard_queries():
        if "rate(" in expr:
            assert "$__rate_interval" in expr


def query(port: int, expr: str) -> list[dict[str, object]]:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        body = json.load(response)
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def has_numbers(result: list[dict[str, object]]) -> bool:
    values = [float(r["value"][1]) for r in result]  # type: ignore[index]
    return bool(values) and all(not math.isnan(v) for v in values)


@needs_peer(PROMETHEUS is not None, "Prometheus is not installed (Debian package `prometheus`)")
def test_every_panel_query_returns_data(tmp_path: Path) -> None:
    # With a validation webhook and its notifications, so that the integration
    # panels have data too.
    with FakeWebhook(SECRET) as hook:
        _every_panel_query_returns_data(tmp_path, hook)


def _every_panel_query_returns_data(tmp_path: Path, hook: FakeWebhook) -> None:
    directory = init_dir(tmp_path / "scep")
    configure_webhook(directory, hook)
    # The webhook tests' short timeout is for their slow receiver; here the
    # receiver shares two cores with Prometheus, two workers and the load,
    # and an answer a second late would refuse an enrollment this test counts.
    set_config(directory, "validation", "timeout_seconds", "15")
    set_config(directory, "server", "workers", "2")
    server: Server = start_server(directory)
    prom_port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: scep-fast\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server.metrics_port}']\n")
    assert PROMETHEUS is not None
    prom_log = (tmp_path / "prometheus.log").open("wb")
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=prom_log, stderr=subprocess.STDOUT)
    try:
        response = server.request("GET", "/scep?operation=GetCACert")
        ra = parse_ca_certs(response.read_body,  # type: ignore[attr-defined]
                            response.getheader("Content-Type")).ra
        requests = make_requests(ra, 120, CHALLENGE, prefix="dash")
        wrong = [build_pkcs_req(ra, cn=f"wrong-{i}", challenge="wrong") for i in range(6)]
        # Load spread over several scrapes, so that every rate has two samples.
        deadline = time.monotonic() + 8
        for i in range(6):
            fire(server.port, requests[i * 20:(i + 1) * 20], concurrency=4)
            fire(server.port, wrong[i:i + 1], concurrency=1)
            time.sleep(max(0.0, min(1.2, deadline - time.monotonic())))
        time.sleep(2.5)  # the last scrape after the load
        missing: dict[str, str] = {}
        until = time.monotonic() + 30
        while time.monotonic() < until:
            missing = {f"{title}: {expr}": "no data" for title, expr in dashboard_queries()
                       if not has_numbers(query(prom_port, expr))}
            if not missing:
                break
            time.sleep(1)
        assert not missing, missing
        # Every panel may have data from a scrape taken before the last requests were
        # counted: the totals are read once a scrape has them (or the deadline passed).
        totals = {"sum(scep_certificates_issued_total)": 120.0,
                  'sum(scep_failinfo_total{fail_info="BAD_REQUEST"})': 6.0}
        seen: dict[str, float] = {}
        until = time.monotonic() + 10
        while True:
            seen = {expr: float(query(prom_port, expr)[0]["value"][1])  # type: ignore[index]
                    for expr in totals}
            if seen == totals or time.monotonic() > until:
                break
            time.sleep(0.5)
        validations = {str(r["metric"]): r["value"][1]  # type: ignore[index]
                       for r in query(prom_port, "sum by (result) (scep_validations_total)")}
        assert seen == totals, validations
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=20)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait(timeout=10)
        server.stop()
