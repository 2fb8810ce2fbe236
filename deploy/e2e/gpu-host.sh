#!/usr/bin/env bash
# The NVML backend on a host with a real NVIDIA GPU, run as root from a
# directory holding bin/ (make build) and bin/nvml.test (make nvml-check):
#   1. nvml.test: readings, process attribution and Xid events against the
#      driver (gpu/nvmlgpu/real_test.go);
#   2. the daemon with `gpu.backend: nvml`: a model waits while a foreign
#      process holds the memory it needs, says so, starts once that memory
#      frees, its GPU memory is attributed to it in /metrics, and a stop
#      gives the memory back.
# Models are fake-vllm behind a wrapper that also takes GPU memory with
# PyTorch (python3 must import torch), as a vLLM would.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
out=${OUT:-$(mktemp -d)}
work=$(mktemp -d)
pass=0 fail=0
ok() { echo "PASS: $*"; pass=$((pass + 1)); }
bad() { echo "FAIL: $*"; fail=$((fail + 1)); }
check() { local d=$1; shift; if "$@"; then ok "$d"; else bad "$d"; fi; }
waitfor() { local n=$(($1 * 10)); shift; while ((n-- > 0)); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done; return 1; }
# hog GIB: a python3 that takes GIB of GPU memory and holds it until killed.
hog() { echo "python3 -c 'import torch,time; x=torch.empty($1<<30,dtype=torch.uint8,device=\"cuda\"); x.fill_(1); print(\"gpu-hog: holding $1 GiB\",flush=True); time.sleep(86400)'"; }

nvidia-smi -L
echo "== nvml.test"
check "nvml.test: readings, process attribution, Xid events" \
	env CITADEL_GPU_HOG="$(hog 2)" bin/nvml.test -test.v -test.count=1

echo "== the daemon on nvml"
total=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits -i 0) # MiB
mkdir -p "$work/models/hog"
cat >"$work/model.sh" <<SH
#!/bin/sh
# A fake vLLM that takes 4 GiB of GPU memory as a real one would.
$(hog 4) &
exec $PWD/bin/fake-vllm "\$@"
SH
chmod +x "$work/model.sh"
cat >"$work/supervisor.yaml" <<YAML
listen: 127.0.0.1:9400
control_socket: $work/supervisor.sock
gpu: {backend: nvml, headroom: 1GiB}
models:
  hog:
    model: $work/models/hog
    command: [$work/model.sh]
    args: [--fake-load-time, 1s]
    port: 11400
    gpu_memory_utilization: 0.5
    probe: {period: 1s, timeout: 1s, startup_timeout: 2m}
    stop_timeout: 10s
YAML
ctl() { bin/citadelctl --socket "$work/supervisor.sock" "$@"; }
metric() { curl -fsS http://127.0.0.1:9400/metrics | awk -v m="$1" 'index($0, m) == 1 {print $NF; exit}'; }

bin/citadel-supervisor --config "$work/supervisor.yaml" --check; echo "--check exit $?"
# A foreign process holds 60% of the GPU: the model (50%) cannot fit.
sh -c "exec $(hog $((total * 6 / 10 / 1024)))" >"$work/foreign.log" 2>&1 &
foreign=$!
waitfor 60 grep -q holding "$work/foreign.log" || bad "the foreign hog took its memory"
bin/citadel-supervisor --config "$work/supervisor.yaml" >"$work/daemon.log" 2>&1 &
daemon=$!
check "daemon answers citadelctl" waitfor 30 ctl status
pending() { ctl status hog | grep -q pending; }
check "hog waits while a foreign process holds the memory" waitfor 30 pending
ctl status hog | tee "$out/status-pending.txt"
check "status names the memory it waits for" grep -q 'free' "$out/status-pending.txt"
kill "$foreign"; wait "$foreign" 2>/dev/null
ready() { ctl status hog | grep -q '^ *hog *ready'; }
check "hog starts once the memory frees" waitfor 120 ready
attributed() { v=$(metric 'citadel_model_gpu_memory_bytes{'); [ -n "$v" ] && awk -v v="$v" 'BEGIN {exit !(v >= 2^32)}'; }
check "the model's GPU memory (4 GiB of its child) is attributed to it" waitfor 60 attributed
ctl status | tee "$out/status-ready.txt"
curl -fsS http://127.0.0.1:9400/metrics | grep -E '^citadel_(gpu|model_gpu)_' | tee "$out/gpu-metrics.txt"
check "citadel_gpu_up is 1" grep -q '^citadel_gpu_up{.*} 1$' "$out/gpu-metrics.txt"
check "backend info says nvml" waitfor 5 sh -c "curl -fsS http://127.0.0.1:9400/metrics | grep -q 'citadel_gpu_backend_info{.*backend=\"nvml\"'"
# Live restore on the real GPU: an upgrade in place, then a SIGKILL of the
# daemon and a new one, keep the model's process and its GPU memory.
hogpid() { ctl status hog | awk '$1 == "hog" && $2 == "ready" {print $3}'; }
same_hog() { [ "$(hogpid)" = "$1" ]; }
p1=$(hogpid)
check "citadelctl upgrade on nvml" ctl upgrade
check "the upgrade kept hog's process" waitfor 10 same_hog "$p1"
check "its GPU memory is still attributed to it after the upgrade" waitfor 30 attributed
kill -9 "$daemon"; wait "$daemon" 2>/dev/null
bin/citadel-supervisor --config "$work/supervisor.yaml" >>"$work/daemon.log" 2>&1 &
daemon=$!
check "a new daemon adopts hog after a SIGKILL (same process, ready)" waitfor 30 same_hog "$p1"
check "its GPU memory is attributed to it by the new daemon" waitfor 30 attributed
check "no second copy took GPU memory" sh -c "[ \$(nvidia-smi --query-compute-apps=pid --format=csv,noheader | wc -l) = 1 ]"
used_before=$(metric 'citadel_gpu_memory_used_bytes{')
ctl stop hog
freed() { v=$(metric 'citadel_gpu_memory_used_bytes{'); awk -v a="$v" -v b="$used_before" 'BEGIN {exit !(b - a >= 2^32)}'; }
check "a stop gives the GPU memory back" waitfor 30 freed
no_procs() { [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ]; }
check "no process left on the GPU" waitfor 30 no_procs
kill -TERM "$daemon"; wait "$daemon"; echo "daemon exit $?"
cp "$work/daemon.log" "$out/daemon.log"
echo "RESULT pass=$pass fail=$fail"
[ "$fail" = 0 ]
