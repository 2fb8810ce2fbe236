#!/bin/bash
# Runs inside the booted container (as citadel-e2e.service). Writes PASS /
# FAIL lines and a RESULT line to /e2e/log, then the unit powers off.
exec >/e2e/log 2>&1
set -u
pass=0 fail=0
ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }
check() { local d=$1; shift; if "$@"; then ok "$d"; else bad "$d"; fi; }
# waitfor SECONDS COMMAND...: poll with a deadline.
waitfor() { local n=$(($1 * 10)); shift; while ((n-- > 0)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
pidof_model() { citadelctl status "$1" | awk -v m="$1" '$1 == m && $2 == "ready" {print $3}'; }

dpkg -i /root/citadel.deb >/dev/null || bad "dpkg -i citadel.deb"
check "systemd-analyze verify: unit is clean" test -z "$(systemd-analyze verify /lib/systemd/system/citadel-supervisor.service 2>&1)"
check "the package enabled the unit" systemctl is-enabled --quiet citadel-supervisor

install -d -o citadel -g citadel /opt/citadel/models/alpha /opt/citadel/models/beta /var/lib/citadel/e2e-pids
cat >/etc/citadel/supervisor.yaml <<'YAML'
listen: 127.0.0.1:9400
gpu:
  backend: sim
  sim:
    devices:
      - {uuid: GPU-00000000-0000-0000-0000-000000000000, name: Sim H100, memory: 80GiB}
defaults:
  command: [/usr/local/bin/fake-vllm]
  args: [--fake-load-time, 1s, --fake-log-every, 1s]
  stop_timeout: 5s
  restart: {delay: 1s}
  probe: {period: 1s, timeout: 1s}
models:
  # alpha starts an escapee, as a hostile model would: env -i and a double
  # fork, no marker, no parent link (its pid goes to the pid dir).
  alpha: {model: /opt/citadel/models/alpha, port: 11400, gpu_memory_utilization: 0.3,
          args: [--fake-load-time, 1s, --fake-log-every, 1s, --fake-escape-env, --fake-pid-dir, /var/lib/citadel/e2e-pids]}
  beta:  {model: /opt/citadel/models/beta, port: 11401, gpu_memory_utilization: 0.3, env: {X: "1"}}
YAML
mkdir -p /etc/systemd/system/citadel-supervisor.service.d
printf '[Service]\nWatchdogSec=4s\n' >/etc/systemd/system/citadel-supervisor.service.d/e2e.conf
systemctl daemon-reload

# Type=notify: start returns once the daemon sent READY=1.
check "systemctl start reaches active" systemctl start citadel-supervisor
check "active" systemctl is-active --quiet citadel-supervisor
if waitfor 60 citadelctl health; then ok "models come up (citadelctl health)"; else
	bad "models come up (citadelctl health)"
	citadelctl status -l
	journalctl -u citadel-supervisor --no-pager | tail -30
fi
check "STATUS= reaches systemd" waitfor 10 sh -c 'systemctl show -p StatusText --value citadel-supervisor | grep -qx "2/2 ready"'
check "journalctl -t citadel-alpha shows the model's output" \
	waitfor 10 sh -c 'journalctl -t citadel-alpha --no-pager | grep -q "Starting vLLM API server"'
check "the daemon's own log stays under its unit" \
	sh -c 'journalctl -u citadel-supervisor --no-pager | grep -q "supervisor running"'
check "the model runs as citadel, not root" sh -c "ps -o user= -p $(pidof_model alpha) | grep -qx citadel"

# Ownership by cgroup (Delegate=yes): the daemon sits in a leaf of its own,
# each model in a leaf under citadel-<id>, and an escapee (a grandchild that
# clears its environment and double-forks) dies with its model's stop.
# cgroup v2 is at /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts.
cg2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
unit_cg=$cg2$(systemctl show -p ControlGroup --value citadel-supervisor)
check "citadelctl status says ownership: cgroup" sh -c 'citadelctl status | grep -q "^Ownership: cgroup"'
# The container has neither curl nor wget: bash's /dev/tcp.
metrics() { exec 3<>/dev/tcp/127.0.0.1/9400 && printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3 && cat <&3; exec 3<&-; }
mode_is_cgroup() { metrics | grep -q '^citadel_ownership_mode{mode="cgroup"} 1'; }
check "citadel_ownership_mode{mode=\"cgroup\"} 1" mode_is_cgroup
check "the daemon moved itself into <unit>/supervisor" \
	grep -qx "$(systemctl show -p MainPID --value citadel-supervisor)" "$unit_cg/supervisor/cgroup.procs"
a_pid=$(pidof_model alpha)
a_cg=$(sed -n 's/^0:://p' "/proc/$a_pid/cgroup")
check "alpha runs in a delegated leaf of its own" sh -c "case '$a_cg' in */citadel-*/alpha@*) true ;; *) false ;; esac"
# The escapee alpha started: env -i, a double fork, SIGTERM ignored, a
# session of its own. It is in alpha's leaf because alpha was cloned into it.
esc_cg=$cg2$a_cg
for _ in $(seq 50); do
	esc=$(grep -lx escapee /var/lib/citadel/e2e-pids/* 2>/dev/null | head -1 | xargs -r basename)
	[ -n "$esc" ] && break
	sleep 0.1
done
check "the escapee is in alpha's leaf" sh -c "test -n '$esc' && grep -qx '0::$a_cg' /proc/$esc/cgroup"
check "citadelctl stop alpha" citadelctl stop alpha
check "the escapee died with alpha" sh -c "test -n '$esc' && ! kill -0 $esc 2>/dev/null"
check "alpha's leaf is removed" sh -c "! test -d '$esc_cg'"
check "citadelctl start alpha" citadelctl start alpha
check "alpha comes back" waitfor 60 citadelctl health

# Reload with one model changed: only that model restarts.
a1=$(pidof_model alpha) b1=$(pidof_model beta)
sed -i 's/X: "1"/X: "2"/' /etc/citadel/supervisor.yaml
check "systemctl reload succeeds" systemctl reload citadel-supervisor
check "reload restarted beta" waitfor 30 sh -c "p=\$(citadelctl status beta | awk '\$1==\"beta\" && \$2==\"ready\" {print \$3}'); [ -n \"\$p\" ] && [ \"\$p\" != $b1 ]"
check "reload left alpha alone (same pid)" test "$(pidof_model alpha)" = "$a1"

# Live restore (docs/operations.md). A package upgrade re-executes the daemon in
# place: the same main process, every model kept.
same_pid() { [ "$(pidof_model "$1")" = "$2" ]; }
mainpid() { systemctl show -p MainPID --value citadel-supervisor; }
same_main() { [ "$(mainpid)" = "$1" ]; }
restarted_from() { m=$(mainpid); [ "$m" != 0 ] && [ "$m" != "$1" ] && systemctl is-active --quiet citadel-supervisor; }
main=$(mainpid) a1=$(pidof_model alpha) b1=$(pidof_model beta)
check "package upgrade (dpkg -i over the installed package)" dpkg -i /root/citadel.deb
check "the upgrade was in place (the journal says so)" \
	waitfor 30 sh -c 'journalctl -u citadel-supervisor --no-pager | grep -q "upgraded in place"'
check "the upgrade kept the daemon's main process" same_main "$main"
check "the upgrade kept alpha's process" waitfor 10 same_pid alpha "$a1"
check "the upgrade kept beta's process" waitfor 10 same_pid beta "$b1"
check "the unit stays active through the upgrade" systemctl is-active --quiet citadel-supervisor
check "citadelctl upgrade (again, by hand)" citadelctl upgrade
check "citadelctl upgrade kept the main process" same_main "$main"
check "citadelctl upgrade kept alpha's process" same_pid alpha "$a1"

# kill -9 of the daemon: systemd restarts it, and the new one adopts the
# models (same PIDs); their output still reaches the journal, through the
# pipes systemd kept in its descriptor store.
kill -9 "$main"
killed=$(date +%s)
check "systemd restarts the killed daemon" waitfor 60 restarted_from "$main"
check "kill -9 \$MAINPID kept alpha's process" waitfor 30 same_pid alpha "$a1"
check "kill -9 \$MAINPID kept beta's process" waitfor 30 same_pid beta "$b1"
check "the new daemon says it adopted them" \
	sh -c 'journalctl -u citadel-supervisor --no-pager | grep -q "adopting a model left running"'
check "alpha's output after the crash reaches the journal" \
	waitfor 20 sh -c "journalctl -t citadel-alpha --since @$((killed + 1)) --no-pager | grep -q 'throughput'"
check "one copy of each model after the crash" test "$(pgrep -c -u citadel -f -- '--served-model-name alpha')" = 1

# A wedged daemon: no watchdog pings, systemd kills and restarts it.
main=$(mainpid) a1=$(pidof_model alpha)
restarts=$(systemctl show -p NRestarts --value citadel-supervisor)
kill -STOP "$main"
check "the watchdog restarts a wedged daemon" \
	waitfor 60 sh -c "[ \$(systemctl show -p NRestarts --value citadel-supervisor) -gt $restarts ] && systemctl is-active --quiet citadel-supervisor"
check "the journal says why" sh -c 'journalctl -u citadel-supervisor --no-pager | grep -qi "watchdog timeout"'
check "models come back after the watchdog restart" waitfor 60 citadelctl health
check "the watchdog's kill kept alpha's process" same_pid alpha "$a1"
check "one copy of each model" test "$(pgrep -c -u citadel -f -- '--served-model-name alpha')" = 1

# Stop: nothing of any model survives.
check "systemctl stop" systemctl stop citadel-supervisor
check "no process of the citadel user is left" sh -c '! pgrep -u citadel >/dev/null'

security=$(systemd-analyze security citadel-supervisor --no-pager 2>&1 | tail -1)
echo "INFO: systemd-analyze security: $security"
echo "RESULT fail=$fail pass=$pass"
