#!/usr/bin/env bash
# Checks what deploy/ ships: the alerting rules (promtool check + unit
# tests), and the dashboard's JSON and every PromQL expression in it.
# Needs promtool (Debian: apt-get install prometheus) and python3.
set -euo pipefail
cd "$(dirname "$0")"

# The unit, where systemd-analyze is there (the binary it names need not be
# installed here; the end-to-end test verifies the installed unit too).
if command -v systemd-analyze >/dev/null; then
	out=$(systemd-analyze verify ./citadel-supervisor.service 2>&1 | grep -v 'citadel-supervisor is not executable' || true)
	if [ -n "$out" ]; then echo "$out"; exit 1; fi
	echo "citadel-supervisor.service: systemd-analyze verify clean"
fi

promtool check rules prometheus/citadel-rules.yml
promtool test rules prometheus/citadel-rules_test.yml

# Parse every dashboard query: wrap them as recording rules for promtool.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 - grafana/citadel-supervisor.json >"$tmp/dashboard-rules.yml" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print("groups:\n  - name: dashboard\n    rules:")
n = 0
for p in d["panels"]:
    for t in p.get("targets", []):
        expr = t["expr"].replace("$instance", ".*")
        n += 1
        print(f"      - record: dashboard:panel{p['id']}:{t['refId']}")
        print(f"        expr: {json.dumps(expr)}")
if n == 0:
    sys.exit("no queries found in the dashboard")
PY
promtool check rules "$tmp/dashboard-rules.yml" >/dev/null
echo "grafana/citadel-supervisor.json: $(grep -c 'record:' "$tmp/dashboard-rules.yml") queries parse"
