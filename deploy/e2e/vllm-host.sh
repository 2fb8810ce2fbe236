#!/usr/bin/env bash
# The daemon against a real vLLM on a real GPU host: what the tests play
# with fake-vllm, checked against the vLLM an operator installed
# (docs/vllm.md). Run as root from a source tree with `make build` done:
#
#   VLLM_PYTHON=/opt/citadel/vllm-env/bin/python \
#   MODEL=/opt/citadel/models/qwen2.5-0.5b-instruct \
#     deploy/e2e/vllm-host.sh
#
# MODEL: a small model directory that fits one GPU at utilization 0.3.
# Optional: GPU (index, default 0), PORT (the model's, default 18400),
# GATEWAY_PORT (default 18000), HTTP_PORT (default 19400), OUT (a directory
# to keep the logs and measurements in), STARTUP (startup_timeout, 20m).
#
# It runs a daemon of its own (its own socket, ports and cache directory)
# and drives: --check; start, probe and a completion through a gateway that
# requires keys, the model wanting a key of its own; the child's
# environment; a level-1 then a level-2 sleep and wake with the GPU memory
# before and after each; an upgrade in place; a SIGKILL of the daemon and
# an adoption; a stop. It prints PASS/FAIL per step and what it measured,
# and exits non-zero if a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2

: "${VLLM_PYTHON:?set VLLM_PYTHON to the python of the vLLM virtualenv}"
: "${MODEL:?set MODEL to a small model directory}"
GPU=${GPU:-0}
PORT=${PORT:-18400}
GATEWAY_PORT=${GATEWAY_PORT:-18000}
HTTP_PORT=${HTTP_PORT:-19400}
STARTUP=${STARTUP:-20m}
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
mkdir -p "$out"
pass=0 fail=0
measured=()

ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }
check() {
	local d=$1
	shift
	if "$@"; then ok "$d"; else bad "$d"; fi
}
# waitfor SECONDS CMD...: run CMD every 0.5 s until it succeeds.
waitfor() {
	local n=$(($1 * 2))
	shift
	while ((n-- > 0)); do
		"$@" >/dev/null 2>&1 && return 0
		sleep 0.5
	done
	return 1
}
measure() { measured+=("$(printf '%-44s %s' "$1" "$2")"); }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f s", b - a}'; }
gpumem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$GPU"; } # MiB
ctl() { bin/citadelctl --socket "$work/supervisor.sock" "$@"; }
field() { ctl -o json status "$1" | python3 -c "import json,sys; print(json.load(sys.stdin)[0].get('$2', ''))"; }
state() { field "$1" state; }
is_state() { [ "$(state "$1")" = "$2" ]; }

for b in bin/citadel-supervisor bin/citadelctl; do
	[ -x "$b" ] || { echo "no $b: run make build first" >&2; exit 2; }
done
command -v nvidia-smi >/dev/null || { echo "nvidia-smi not found: this is for a GPU host" >&2; exit 2; }
echo "== host"
nvidia-smi -L
uuid=$(nvidia-smi --query-gpu=uuid --format=csv,noheader -i "$GPU")
version=$("$VLLM_PYTHON" -c 'import importlib.metadata as m; print(m.version("vllm"))') || {
	echo "$VLLM_PYTHON has no vllm" >&2
	exit 2
}
echo "vLLM $version ($VLLM_PYTHON), model $MODEL, GPU $GPU ($uuid)"
measure "vLLM (package metadata)" "$version"

# Secrets: the model's own key in an env file, the gateway's client key in
# its keys file; neither may appear in any output.
model_key="sk-e2e-model-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
client_key="sk-e2e-client-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
printf 'VLLM_API_KEY=%s\n' "$model_key" >"$work/model.env"
printf 'e2e %s\n' "$client_key" >"$work/api-keys"
chmod 600 "$work/model.env" "$work/api-keys"

write_config() { # write_config SLEEP_LEVEL
	cat >"$work/supervisor.yaml" <<YAML
listen: 127.0.0.1:$HTTP_PORT
control_socket: $work/supervisor.sock
cache_dir: $work/cache
log: {level: info, format: json}
gpu: {backend: nvml, headroom: 1GiB}
gateway: {listen: 127.0.0.1:$GATEWAY_PORT, api_keys_file: $work/api-keys, max_wait: 20m}
models:
  m:
    command: [$VLLM_PYTHON, -m, vllm.entrypoints.openai.api_server]
    model: $MODEL
    port: $PORT
    gpus: [$GPU]
    gpu_memory_utilization: 0.3
    max_model_len: 2048
    env_files: [$work/model.env]
    args: [--disable-log-stats, --enforce-eager]
    activation: on_demand
    sleep_level: $1
    idle_after: 1h
    min_awake: 0s
    stop_timeout: 60s
    probe: {period: 2s, timeout: 5s, startup_timeout: $STARTUP}
YAML
}
chat() { # chat KEY: a completion through the gateway; prints the HTTP code
	curl -s -o "$work/chat.json" -w '%{http_code}' -H "Authorization: Bearer $1" \
		-H 'Content-Type: application/json' "http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions" \
		-d '{"model":"m","messages":[{"role":"user","content":"Say hello."}],"max_tokens":8,"temperature":0}'
}
chat_ok() { [ "$(chat "$client_key")" = 200 ]; }

write_config 1
echo "== --check"
bin/citadel-supervisor --check --config "$work/supervisor.yaml" | tee "$out/check.txt"
check "--check learns the version from the interpreter" grep -q " m  *$version\$" "$out/check.txt"

echo "== start, probe, a completion"
bin/citadel-supervisor --config "$work/supervisor.yaml" >"$work/daemon.log" 2>&1 &
daemon=$!
check "the daemon answers citadelctl" waitfor 30 ctl status
check "no client key: 401" sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$GATEWAY_PORT/v1/models)\" = 401 ]"
t0=$(now)
check "a first request starts the model and is answered" waitfor 1800 chat_ok
measure "cold start to first answer" "$(since "$t0")"
cp "$work/chat.json" "$out/first-answer.json"
check "ready" is_state m ready
check "the model's own key is refused at the gateway" sh -c "[ \"\$(curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer $model_key' http://127.0.0.1:$GATEWAY_PORT/v1/models)\" = 401 ]"
waitfor 30 sh -c "[ \"\$(bin/citadelctl --socket $work/supervisor.sock -o json status m | grep -c '\"vllm_version_source\": \"server\"')\" = 1 ]"
check "GET /version confirmed the version" sh -c "[ \"$(field m vllm_version)\" = \"$version\" ]"
measure "status vllm_version (source)" "$(field m vllm_version) ($(field m vllm_version_source))"
pid=$(field m pid)
env_of() { tr '\0' '\n' <"/proc/$pid/environ" | grep "^$1=" | cut -d= -f2-; }
check "CUDA_VISIBLE_DEVICES is the NVML index $GPU" sh -c "[ \"$(env_of CUDA_VISIBLE_DEVICES)\" = \"$GPU\" ]"
check "CUDA_DEVICE_ORDER is PCI_BUS_ID" sh -c "[ \"$(env_of CUDA_DEVICE_ORDER)\" = PCI_BUS_ID ]"
check "VLLM_CACHE_ROOT is the model's own" sh -c "[ \"$(env_of VLLM_CACHE_ROOT)\" = \"$work/cache/vllm/m\" ]"
measure "VLLM_PORT block" "$(env_of VLLM_PORT) (ephemeral: $(tr '\t' - </proc/sys/net/ipv4/ip_local_port_range))"

sleep_wake() { # sleep_wake LEVEL
	local before after t
	before=$(gpumem)
	t=$(now)
	ctl sleep m >/dev/null
	if waitfor 300 is_state m sleeping; then
		measure "level-$1 sleep" "$(since "$t")"
		after=$(gpumem)
		measure "GPU memory awake → asleep (level $1)" "$before → $after MiB ($(field m reason))"
		ok "level-$1 sleep: $(field m reason)"
	elif is_state m stopped; then
		# This vLLM lacks what the level needs: the daemon stopped it.
		ok "level $1 not available in vLLM $version: $(field m reason)"
		measure "level-$1 sleep" "fell back: $(field m reason)"
	else
		bad "level-$1 sleep: $(state m) $(field m reason)"
	fi
	t=$(now)
	check "a request after the level-$1 sleep is answered" waitfor 1800 chat_ok
	measure "level-$1 wake (request to answer)" "$(since "$t")"
	measure "GPU memory after the wake" "$(gpumem) MiB"
}
echo "== level-1 sleep and wake"
sleep_wake 1
echo "== level-2 sleep and wake"
write_config 2
ctl reload >/dev/null
check "the reload restarts the model for sleep_level 2" waitfor 1800 chat_ok
sleep_wake 2

echo "== upgrade in place"
pid=$(field m pid)
same_pid() { [ "$(field m pid)" = "$1" ] && is_state m ready; }
check "citadelctl upgrade" ctl upgrade
check "the upgrade kept the model's process" waitfor 60 same_pid "$pid"
check "it answers after the upgrade" chat_ok

echo "== SIGKILL of the daemon, a new one adopts"
kill -9 "$daemon"
wait "$daemon" 2>/dev/null
bin/citadel-supervisor --config "$work/supervisor.yaml" >>"$work/daemon.log" 2>&1 &
daemon=$!
check "a new daemon adopts the model (same process, ready)" waitfor 120 same_pid "$pid"
apps() { nvidia-smi --query-compute-apps=pid --format=csv,noheader -i "$GPU" | grep -c .; }
check "no second copy on the GPU" sh -c "[ \$(nvidia-smi --query-compute-apps=pid --format=csv,noheader -i $GPU | grep -c .) -le 1 ]"
check "it answers after the adoption" chat_ok

echo "== stop"
ctl stop m >/dev/null
gone() { [ "$(apps)" = 0 ]; }
check "a stop leaves no process on the GPU" waitfor 120 gone
kill -TERM "$daemon"
wait "$daemon"
echo "daemon exit $?"

echo "== secrets"
curl -s "http://127.0.0.1:$HTTP_PORT/metrics" >"$work/metrics.txt" 2>/dev/null
for f in "$work/daemon.log" "$out/check.txt" "$work/metrics.txt"; do
	check "no key in $(basename "$f")" sh -c "! grep -qe '$model_key' -e '$client_key' '$f'"
done

cp "$work/daemon.log" "$out/daemon.log"
echo
echo "== measured (vLLM $version, $(nvidia-smi --query-gpu=name --format=csv,noheader -i "$GPU"))"
printf '%s\n' "${measured[@]}" | tee "$out/measured.txt"
echo "RESULT pass=$pass fail=$fail (logs in $out)"
[ "$fail" = 0 ]
