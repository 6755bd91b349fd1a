#!/usr/bin/env python3
"""Writes the Grafana dashboards in dashboards/ from the panel lists below.

Run from this folder after changing a panel: python3 generate.py
Every query uses the node's own metric names; node/tests/prometheus.rs
evaluates each one against a real Prometheus scraping a devnet.
"""
import json

def panel(title, exprs, unit="short", thresholds=(), legend="{{instance}}", kind="timeseries"):
    return {"title": title, "exprs": exprs, "unit": unit, "thresholds": list(thresholds),
            "legend": legend, "kind": kind}

RATE = "sum by (instance) (rate({m}[5m]))"

DASHBOARDS = {
    "overview": ("Open-AGI: overview", [
        panel("Peers connected", ["openagi_peers_connected"], thresholds=[(0, "red"), (1, "green")]),
        panel("Ledger height", ["openagi_consensus_height"]),
        panel("Committed transactions per second", [RATE.format(m="openagi_consensus_committed_transactions_total")], unit="ops"),
        panel("Commit latency p50 and p99", [
            "histogram_quantile(0.5, sum by (instance, le) (rate(openagi_consensus_commit_latency_seconds_bucket[5m])))",
            "histogram_quantile(0.99, sum by (instance, le) (rate(openagi_consensus_commit_latency_seconds_bucket[5m])))",
        ], unit="s"),
        panel("Alerts firing", ["sum by (instance) (openagi_alerts_firing)"], thresholds=[(0, "green"), (1, "red")]),
        panel("Resident memory", ["openagi_process_resident_memory_bytes"], unit="bytes",
              thresholds=[(0, "green"), (943718400, "orange")]),
        panel("Space available for the data directory", ["openagi_data_dir_available_bytes"], unit="bytes",
              thresholds=[(0, "red"), (1073741824, "green")]),
        panel("Uptime", ["openagi_process_uptime_seconds"], unit="s"),
        panel("Build", ["openagi_build_info"], legend="{{instance}} {{version}} {{git_commit}}", kind="table"),
    ]),
    "consensus": ("Open-AGI: consensus", [
        panel("Ledger height", ["openagi_consensus_height"]),
        panel("Blocks committed per second", [RATE.format(m="openagi_consensus_committed_blocks_total")], unit="ops"),
        panel("Transactions committed per second", [RATE.format(m="openagi_consensus_committed_transactions_total")], unit="ops"),
        panel("View", ["openagi_consensus_view"]),
        panel("View changes per second", [RATE.format(m="openagi_consensus_view_changes_total")], unit="ops",
              thresholds=[(0, "green"), (0.05, "orange")]),
        panel("Transactions waiting", ["openagi_consensus_pending_transactions"]),
        panel("Validators silent for 30 s", ["openagi_consensus_validators_silent"],
              thresholds=[(0, "green"), (1, "orange")]),
        panel("Persist duration p99", [
            "histogram_quantile(0.99, sum by (instance, le) (rate(openagi_consensus_persist_duration_seconds_bucket[5m])))"], unit="s"),
        panel("Consensus messages dropped per second",
              ["sum by (instance, reason) (rate(openagi_consensus_messages_dropped_total[5m]))"], unit="ops",
              legend="{{instance}} {{reason}}"),
        panel("Submissions refused per second",
              ["sum by (instance) (rate(openagi_consensus_submissions_refused_total[5m]))"], unit="ops"),
        panel("Blocks served from disk per second", [RATE.format(m="openagi_consensus_blocks_served_from_disk_total")], unit="ops"),
    ]),
    "network": ("Open-AGI: network", [
        panel("Peers connected", ["openagi_peers_connected"], thresholds=[(0, "red"), (1, "green")]),
        panel("Connections opened per second",
              ["sum by (instance, direction) (rate(openagi_connections_opened_total[5m]))"], unit="ops",
              legend="{{instance}} {{direction}}"),
        panel("Payload bytes per second by protocol",
              ["sum by (instance, protocol, direction) (rate(openagi_p2p_payload_bytes_total[5m]))"], unit="Bps",
              legend="{{instance}} {{protocol}} {{direction}}"),
        panel("Gossip messages per second",
              ["sum by (instance, outcome) (rate(openagi_gossip_messages_total[5m]))"], unit="ops",
              legend="{{instance}} {{outcome}}"),
        panel("Dial errors per second", [RATE.format(m="openagi_dial_errors_total")], unit="ops",
              thresholds=[(0, "green"), (1, "orange")]),
        panel("Inbound refused per second",
              ["sum by (instance, protocol, reason) (rate(openagi_p2p_inbound_refused_total[5m]))"], unit="ops",
              legend="{{instance}} {{protocol}} {{reason}}", thresholds=[(0, "green"), (10, "orange")]),
        panel("Peers refused per second",
              ["sum by (instance, reason) (rate(openagi_peers_refused_total[5m]))"], unit="ops",
              legend="{{instance}} {{reason}}"),
        panel("Direct sends failed per second", [RATE.format(m="openagi_direct_send_failures_total")], unit="ops"),
        panel("Ping round trip p50", [
            "histogram_quantile(0.5, sum by (instance, le) (rate(openagi_libp2p_ping_rtt_seconds_bucket[5m])))"], unit="s"),
    ]),
    "learning": ("Open-AGI: federated learning", [
        panel("Round of each job", ["openagi_learn_round"], legend="{{instance}} {{job}}"),
        panel("Accuracy of each job", ["openagi_learn_accuracy_ratio"], unit="percentunit", legend="{{instance}} {{job}}"),
        panel("ε spent by each job (with DP)", ["openagi_learn_epsilon"], legend="{{instance}} {{job}}"),
        panel("Share of the ε budget spent", ["openagi_learn_epsilon_budget_used_ratio"], unit="percentunit",
              legend="{{instance}} {{job}}", thresholds=[(0, "green"), (0.9, "orange")]),
        panel("Rounds per minute by outcome",
              ["sum by (instance, outcome) (rate(openagi_learn_rounds_total[5m])) * 60"], unit="short",
              legend="{{instance}} {{outcome}}"),
        panel("Updates received, refused and sent per second", [
            RATE.format(m="openagi_learn_updates_received_total"),
            RATE.format(m="openagi_learn_updates_refused_total"),
            RATE.format(m="openagi_learn_updates_sent_total"),
        ], unit="ops"),
        panel("Stragglers per second", [RATE.format(m="openagi_learn_stragglers_total")], unit="ops"),
        panel("Local rounds failed per second", [RATE.format(m="openagi_learn_participation_failures_total")], unit="ops"),
    ]),
}


def grafana(uid, title, panels):
    out = []
    for i, p in enumerate(panels):
        steps = [{"color": c, "value": (None if j == 0 else v)} for j, (v, c) in enumerate(p["thresholds"])]
        out.append({
            "id": i + 1,
            "type": p["kind"],
            "title": p["title"],
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": 12, "x": (i % 2) * 12, "y": (i // 2) * 8},
            "fieldConfig": {
                "defaults": {
                    "unit": p["unit"],
                    "thresholds": {"mode": "absolute", "steps": steps or [{"color": "green", "value": None}]},
                    "custom": {"thresholdsStyle": {"mode": "line" if steps else "off"}},
                },
                "overrides": [],
            },
            "targets": [
                {"refId": chr(65 + k), "expr": e, "legendFormat": p["legend"],
                 "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                for k, e in enumerate(p["exprs"])
            ],
        })
    return {
        "uid": f"openagi-{uid}",
        "title": title,
        "tags": ["openagi"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "datasource", "type": "datasource", "query": "prometheus",
            "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0,
        }]},
        "panels": out,
    }


if __name__ == "__main__":
    for uid, (title, panels) in DASHBOARDS.items():
        with open(f"dashboards/{uid}.json", "w") as f:
            json.dump(grafana(uid, title, panels), f, indent=2, ensure_ascii=False)
            f.write("\n")
