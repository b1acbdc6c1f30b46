#!/usr/bin/env bash
# pacer vs nginx vs a bare hyper proxy, in one run, loopback only (issue 10).
#
#   bash bench/compare.sh            # BENCH_SECONDS=10 BENCH_CONNECTIONS=64 by default
#
# Installs nginx (Debian nginx-light) and wrk when missing, builds pacer and the bare proxy
# (examples/bare_proxy.rs) in release mode, then starts an nginx origin answering a small
# JSON body and drives each target with the same wrk load: the origin directly, nginx as a
# plain proxy (1 worker, then `auto`), pacer with a per-client limit that never binds, and
# the bare hyper proxy (multi-thread, then current-thread). CPU per request comes from
# /proc (utime+stime of the target's process tree over the measured run), RSS from VmRSS.
# Results: bench/results/latest.md. Every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

BENCH_SECONDS="${BENCH_SECONDS:-10}"
BENCH_CONNECTIONS="${BENCH_CONNECTIONS:-64}"
WRK_THREADS=2
WARMUP_SECONDS=2
# Six targets, each warmed up and measured: 40 s each keeps the whole run under 5 minutes.
MAX_SECONDS=40
OUT="$ROOT/bench/results/latest.md"
CLIENT_HEADER="x-bench-client"
CLIENT_ID="bench"
BODY='{"id":"x","name":"bench"}'

die() { echo "bench: $*" >&2; exit 1; }
case "$BENCH_SECONDS" in '' | *[!0-9]*) die "BENCH_SECONDS must be a whole number of seconds" ;; esac
case "$BENCH_CONNECTIONS" in '' | *[!0-9]*) die "BENCH_CONNECTIONS must be a whole number" ;; esac
((BENCH_SECONDS >= 1 && BENCH_SECONDS <= MAX_SECONDS)) \
  || die "BENCH_SECONDS must be 1..$MAX_SECONDS (the run is bounded to 5 minutes)"
((BENCH_CONNECTIONS >= WRK_THREADS && BENCH_CONNECTIONS <= 4096)) \
  || die "BENCH_CONNECTIONS must be $WRK_THREADS..4096"

# --- what is needed ---------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1; }
apt_install() {
  need apt-get || die "apt-get not found; install $* by hand"
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  else
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
  fi
}
NGINX="$(command -v nginx || true)"
[ -n "$NGINX" ] || [ ! -x /usr/sbin/nginx ] || NGINX=/usr/sbin/nginx
if [ -z "$NGINX" ]; then
  apt_install nginx-light
  NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
fi
[ -x "$NGINX" ] || die "nginx not found after installing nginx-light"
need wrk || apt_install wrk
need cargo || die "cargo is required"

cargo build --release --bin pacer --example bare_proxy
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PACER="$TARGET_DIR/release/pacer"
BARE="$TARGET_DIR/release/examples/bare_proxy"
[ -x "$PACER" ] && [ -x "$BARE" ] || die "built binaries not found under $TARGET_DIR/release"

# --- processes and cleanup --------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pacer-bench.XXXXXX")"
chmod 755 "$WORK" # nginx workers may run as another user
PIDS=()
cleanup() {
  local rc=$?
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ "$rc" = 0 ]; then rm -rf "$WORK"; else echo "bench: failed; logs kept in $WORK" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: runs CMD in the background with its output in $WORK/NAME.log.
STARTED_PID=
start() {
  local name=$1
  shift
  "$@" >"$WORK/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}
# stop PID: TERM, wait up to 5 s, then KILL.
stop() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}
# forget PID: no longer ours to stop on exit.
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

listening() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# A port nobody listens on, below the ephemeral range (where outgoing connections live).
USED_PORTS=" "
free_port() {
  local p
  for _ in $(seq 200); do
    p=$((20000 + RANDOM % 12000))
    case "$USED_PORTS" in *" $p "*) continue ;; esac
    if ! listening "$p"; then
      USED_PORTS+="$p "
      echo "$p"
      return 0
    fi
  done
  die "no free port found"
}
# wait_ready NAME PID PORT: until PORT accepts connections (at most 30 s).
wait_ready() {
  local name=$1 pid=$2 port=$3
  for _ in $(seq 300); do
    listening "$port" && return 0
    kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.log" >&2; die "$name exited during start"; }
    sleep 0.1
  done
  cat "$WORK/$name.log" >&2
  die "$name did not listen on $port within 30 s"
}
# check NAME PORT: one request must come back 200 with the origin's body.
check() {
  local name=$1 port=$2 got
  got="$(curl -sS -m 5 -H "$CLIENT_HEADER: $CLIENT_ID" -w ' %{http_code}' "http://127.0.0.1:$port/items/1")" \
    || die "$name: request failed"
  [ "$got" = "$BODY 200" ] || die "$name: expected '$BODY 200', got '$got'"
}
need curl || apt_install curl

# --- /proc ------------------------------------------------------------------------------
CLK_TCK="$(getconf CLK_TCK)"
tree_pids() {
  local pid=$1 c
  echo "$pid"
  for c in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do tree_pids "$c"; done
}
# utime+stime of PID and its descendants, in clock ticks.
cpu_ticks() {
  local total=0 p s f
  for p in $(tree_pids "$1"); do
    s="$(cat /proc/"$p"/stat 2>/dev/null)" || continue
    s="${s##*) }" # after the command name, which may hold spaces and parentheses
    read -ra f <<<"$s"
    total=$((total + f[11] + f[12]))
  done
  echo "$total"
}
# VmRSS of PID and its descendants, in KiB.
rss_kib() {
  local total=0 p v
  for p in $(tree_pids "$1"); do
    v="$(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status 2>/dev/null || true)"
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# --- wrk --------------------------------------------------------------------------------
# parse_wrk FILE → "requests rps p50_ms p99_ms non2xx socket_errors"
parse_wrk() {
  awk '
    function num(v,   m, x) {          # 12.5k, 1.2M, 345 → number
      m = 1
      if (v ~ /[kK]$/) { m = 1e3; sub(/[kK]$/, "", v) }
      else if (v ~ /M$/) { m = 1e6; sub(/M$/, "", v) }
      else if (v ~ /G$/) { m = 1e9; sub(/G$/, "", v) }
      x = v + 0
      return x * m
    }
    function ms(v,   x) {             # 850.00us, 1.20ms, 1.05s, 2.00m → milliseconds
      if (v ~ /us$/) { sub(/us$/, "", v); return v / 1000 }
      if (v ~ /ms$/) { sub(/ms$/, "", v); return v + 0 }
      if (v ~ /s$/)  { sub(/s$/, "", v);  return v * 1000 }
      if (v ~ /m$/)  { sub(/m$/, "", v);  return v * 60000 }
      if (v ~ /h$/)  { sub(/h$/, "", v);  return v * 3600000 }
      return -1
    }
    /Latency Distribution/ { dist = 1; next }
    dist && $1 == "50%" { p50 = ms($2) }
    dist && $1 == "99%" { p99 = ms($2); dist = 0 }
    / requests in / { req = num($1) }
    /^Requests\/sec:/ { rps = num($2) }
    /Non-2xx or 3xx responses:/ { bad = num($NF) }
    /Socket errors:/ {
      for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) { x = $i; sub(/,/, "", x); sock += x }
    }
    END {
      if (req == "" || rps == "" || p50 == "" || p99 == "") exit 1
      printf "%d %.1f %.3f %.3f %d %d\n", req, rps, p50, p99, bad, sock
    }' "$1"
}

WRK_ARGS=(-t"$WRK_THREADS" -c"$BENCH_CONNECTIONS" -H "$CLIENT_HEADER: $CLIENT_ID" --latency)
ROWS=()
declare -A RPS P50 P99 CPU RSS

# run_wrk SECONDS URL OUTFILE: in the background and waited for, so that a signal stops it
# (and the run) at once; bounded by `timeout` in any case.
run_wrk() {
  timeout $(($1 + 30)) wrk "${WRK_ARGS[@]}" -d"$1s" "$2" >"$3" 2>&1 &
  local pid=$!
  PIDS+=("$pid")
  wait "$pid" || { cat "$3" >&2; die "wrk failed against $2"; }
  forget "$pid"
}

# measure NAME LABEL PID PORT: warm up, then one measured wrk run; appends a table row.
measure() {
  local name=$1 label=$2 pid=$3 port=$4 url t0 t1 req rps p50 p99 bad sock cpu rss
  url="http://127.0.0.1:$port/items/1"
  run_wrk "$WARMUP_SECONDS" "$url" "$WORK/wrk-$name-warmup.txt"
  t0="$(cpu_ticks "$pid")"
  run_wrk "$BENCH_SECONDS" "$url" "$WORK/wrk-$name.txt"
  t1="$(cpu_ticks "$pid")"
  rss="$(rss_kib "$pid")"
  read -r req rps p50 p99 bad sock < <(parse_wrk "$WORK/wrk-$name.txt") \
    || { cat "$WORK/wrk-$name.txt" >&2; die "$name: could not parse wrk's output"; }
  ((req > 0)) || die "$name: no requests completed"
  cpu="$(awk -v d=$((t1 - t0)) -v hz="$CLK_TCK" -v n="$req" 'BEGIN { printf "%.1f", d * 1e6 / hz / n }')"
  RPS[$name]=$rps P50[$name]=$p50 P99[$name]=$p99 CPU[$name]=$cpu RSS[$name]=$rss
  ROWS+=("$(awk -v l="$label" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v cpu="$cpu" \
    -v rss="$rss" -v bad="$bad" -v sock="$sock" 'BEGIN {
      printf "| %s | %.0f | %.2f ms | %.2f ms | %s | %.1f MiB | %d / %d |", l, rps, p50, p99, cpu, rss / 1024, bad, sock
    }')")
  printf 'bench: %-42s %8.0f req/s  p50 %6.2f ms  p99 %6.2f ms  %6s µs/req  RSS %6d KiB  non-2xx %d, socket errors %d\n' \
    "$label" "$rps" "$p50" "$p99" "$cpu" "$rss" "$bad" "$sock" >&2
}

# --- configurations ---------------------------------------------------------------------
# nginx_conf NAME WORKERS PORT LOCATION [UPSTREAM_BLOCK] → path of a self-contained config.
nginx_conf() {
  local workers=$2 port=$3 location=$4 upstream=${5:-} dir="$WORK/$1"
  mkdir -p "$dir"
  chmod 755 "$dir"
  cat >"$dir/nginx.conf" <<EOF
worker_processes $workers;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $dir/body;
  proxy_temp_path $dir/proxy;
  fastcgi_temp_path $dir/fastcgi;
  uwsgi_temp_path $dir/uwsgi;
  scgi_temp_path $dir/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  $upstream
  server {
    listen 127.0.0.1:$port;
    location / {
      $location
    }
  }
}
EOF
  echo "$dir/nginx.conf"
}

ORIGIN_PORT="$(free_port)"
ORIGIN_CONF="$(nginx_conf origin 1 "$ORIGIN_PORT" "default_type application/json;
      return 200 '$BODY';")"
# proxy_conf NAME WORKERS PORT: nginx as a plain reverse proxy to the origin.
proxy_conf() {
  nginx_conf "$1" "$2" "$3" "proxy_pass http://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";" "upstream origin {
    server 127.0.0.1:$ORIGIN_PORT;
    keepalive 128;
    keepalive_requests 1000000;
  }"
}

pacer_conf() {
  local port=$1 admin=$2 path="$WORK/pacer.toml"
  cat >"$path" <<EOF
# Generated by bench/compare.sh: pacer in front of the nginx origin, one route, a
# per-client limit that never binds, callers told apart by the $CLIENT_HEADER header.
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"

# No access log, like the nginx targets' access_log off: both measure proxying alone.
[log]
access = false

[[upstream]]
name = "origin"
url = "http://127.0.0.1:$ORIGIN_PORT"

[[route]]
prefix = "/"
upstream = "origin"
identity = ["header:$CLIENT_HEADER"]

[identity]
tokens_me = false

[[limit]]
name = "never-binds"
upstream = "origin"
scope = "client"
requests = 100_000_000
per = "1s"
EOF
  echo "$path"
}

# --- the run ----------------------------------------------------------------------------
RUN_START=$SECONDS
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
"$NGINX" -t -q -p "$WORK/origin" -c "$ORIGIN_CONF" -e "$WORK/origin/error.log" \
  || die "nginx rejected the origin configuration"
start origin "$NGINX" -p "$WORK/origin" -c "$ORIGIN_CONF" -e "$WORK/origin/error.log"
ORIGIN_PID=$STARTED_PID
wait_ready origin "$ORIGIN_PID" "$ORIGIN_PORT"
check origin "$ORIGIN_PORT"

echo "bench: origin on $ORIGIN_PORT; wrk -t$WRK_THREADS -c$BENCH_CONNECTIONS -d${BENCH_SECONDS}s --latency (after ${WARMUP_SECONDS}s warm-up)" >&2
measure direct "origin directly (reference)" "$ORIGIN_PID" "$ORIGIN_PORT"

for workers in 1 auto; do
  port="$(free_port)"
  conf="$(proxy_conf "nginx-$workers" "$workers" "$port")"
  "$NGINX" -t -q -p "$WORK/nginx-$workers" -c "$conf" -e "$WORK/nginx-$workers/error.log" \
    || die "nginx rejected the proxy configuration"
  start "nginx-$workers" "$NGINX" -p "$WORK/nginx-$workers" -c "$conf" -e "$WORK/nginx-$workers/error.log"
  pid=$STARTED_PID
  wait_ready "nginx-$workers" "$pid" "$port"
  check "nginx-$workers" "$port"
  measure "nginx-$workers" "nginx proxy, worker_processes $workers" "$pid" "$port"
  stop "$pid"
done

port="$(free_port)"
admin="$(free_port)"
conf="$(pacer_conf "$port" "$admin")"
"$PACER" check-config "$conf" >"$WORK/pacer-check.log" 2>&1 \
  || { cat "$WORK/pacer-check.log" >&2; die "pacer rejected the generated configuration"; }
start pacer "$PACER" run --config "$conf"
pid=$STARTED_PID
wait_ready pacer "$pid" "$port"
PACER_IDLE_RSS="$(rss_kib "$pid")"
check pacer "$port"
measure pacer "pacer" "$pid" "$port"
stop "$pid"

for mode in multi current; do
  port="$(free_port)"
  flag=()
  [ "$mode" = current ] && flag=(--current-thread)
  start "bare-$mode" "$BARE" "${flag[@]}" "127.0.0.1:$port" "http://127.0.0.1:$ORIGIN_PORT"
  pid=$STARTED_PID
  wait_ready "bare-$mode" "$pid" "$port"
  check "bare-$mode" "$port"
  measure "bare-$mode" "bare hyper proxy, $mode-thread runtime" "$pid" "$port"
  stop "$pid"
done
stop "$ORIGIN_PID"
RUN_SECONDS=$((SECONDS - RUN_START))

# --- results ----------------------------------------------------------------------------
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f×", a / b; else print "n/a" }'; }
# verdict A B LIMIT le|ge: whether A/B is within LIMIT.
verdict() {
  awk -v a="$1" -v b="$2" -v lim="$3" -v op="$4" 'BEGIN {
    if (b <= 0) { print "n/a"; exit }
    r = a / b
    ok = (op == "le") ? (r <= lim) : (r >= lim)
    print ok ? "met" : "not met"
  }'
}
CPU_MODEL="$(awk -F': *' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
[ -n "$CPU_MODEL" ] || CPU_MODEL="$(awk -F': *' '/^(Hardware|Model|cpu model)/ { print $2; exit }' /proc/cpuinfo)"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
DIRTY="$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | head -1)"
[ -z "$DIRTY" ] || COMMIT="$COMMIT (with uncommitted changes in src/)"

mkdir -p "$(dirname "$OUT")"
{
  echo "# pacer vs nginx vs a bare hyper proxy"
  echo
  echo "Written by \`bash bench/compare.sh\`; one run, every target under the same load."
  echo
  echo "## Machine"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "- nproc: $(nproc); CPU: ${CPU_MODEL:-unknown}"
  echo "- kernel: $(uname -srm)"
  echo "- load average before the run: $LOAD_BEFORE (wrk, the origin and the target share these"
  echo "  CPUs; on a busy machine requests/s and p99 move most, CPU per request least)"
  echo "- pacer commit: $COMMIT; $("$NGINX" -v 2>&1); $(wrk -v 2>&1 | head -1 | awk '{print $1, $2}')"
  echo
  echo "## Settings"
  echo
  echo "- wrk: \`wrk -t$WRK_THREADS -c$BENCH_CONNECTIONS -d${BENCH_SECONDS}s --latency -H '$CLIENT_HEADER: $CLIENT_ID' http://127.0.0.1:PORT/items/1\`,"
  echo "  after a ${WARMUP_SECONDS}s warm-up with the same settings; wrk runs on the same machine, loopback only"
  echo "- origin: nginx, \`worker_processes 1\`, \`access_log off\`, \`return 200 '$BODY'\` (application/json)"
  echo "- nginx proxy: \`access_log off\`, upstream \`keepalive 128\`, \`proxy_http_version 1.1\`,"
  echo "  \`proxy_set_header Connection \"\"\`, \`keepalive_requests 1000000\` (client and upstream side,"
  echo "  so that no side recycles connections during the run); \`worker_processes 1\`, then \`auto\` ($(nproc) here)"
  echo "- pacer: release build, \`pacer run --config\` with one upstream and one route, callers"
  echo "  identified by \`header:$CLIENT_HEADER\`, \`tokens_me = false\`, a \`scope = \"client\"\` limit of"
  echo "  100 000 000 requests per 1s (never binds); everything else default. Access log off"
  echo "  (\`[log] access = false\`, as nginx's \`access_log off\`); logs at the default level (info)"
  echo "- bare proxy: \`examples/bare_proxy.rs\` (hyper 1 auto server, hyper-util legacy client with"
  echo "  pooled keep-alive connections), tokio multi-thread runtime, then \`--current-thread\`"
  echo "- CPU µs/request: utime+stime of the target's process tree (nginx: master + workers) from"
  echo "  /proc/PID/stat, delta over the measured run, divided by the requests wrk completed"
  echo "- RSS: VmRSS after the measured run (nginx: master + workers). pacer idle RSS (listening,"
  echo "  before any request): $(awk -v k="$PACER_IDLE_RSS" 'BEGIN { printf "%.1f MiB", k / 1024 }')"
  echo "- whole run (without the build): ${RUN_SECONDS}s"
  echo
  echo "## Results"
  echo
  echo "| target | requests/s | p50 | p99 | CPU µs/request | RSS | non-2xx / socket errors |"
  echo "|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "## Ratios"
  echo
  echo "| ratio | value | target |"
  echo "|---|---|---|"
  echo "| pacer / nginx (1 worker), CPU per request | $(ratio "${CPU[pacer]}" "${CPU[nginx-1]}") | ≤ 1.5×: $(verdict "${CPU[pacer]}" "${CPU[nginx-1]}" 1.5 le) |"
  echo "| pacer / nginx (auto), throughput | $(ratio "${RPS[pacer]}" "${RPS[nginx-auto]}") | ≥ 0.8×: $(verdict "${RPS[pacer]}" "${RPS[nginx-auto]}" 0.8 ge) |"
  echo "| pacer / nginx (auto), p99 | $(ratio "${P99[pacer]}" "${P99[nginx-auto]}") | ≤ 1.5×: $(verdict "${P99[pacer]}" "${P99[nginx-auto]}" 1.5 le) |"
  echo "| pacer / nginx (1 worker), p99 | $(ratio "${P99[pacer]}" "${P99[nginx-1]}") | |"
  echo "| pacer idle RSS | $(awk -v k="$PACER_IDLE_RSS" 'BEGIN { printf "%.1f MiB", k / 1024 }') | ≤ 20 MiB: $(verdict "$PACER_IDLE_RSS" 1024 20 le) |"
  for mode in multi current; do
    echo "| pacer / bare proxy ($mode-thread), CPU per request | $(ratio "${CPU[pacer]}" "${CPU[bare-$mode]}") | |"
    echo "| pacer / bare proxy ($mode-thread), throughput | $(ratio "${RPS[pacer]}" "${RPS[bare-$mode]}") | |"
    echo "| pacer / bare proxy ($mode-thread), p99 | $(ratio "${P99[pacer]}" "${P99[bare-$mode]}") | |"
  done
  for mode in multi current; do
    echo "| bare proxy ($mode-thread) / nginx (1 worker), CPU per request | $(ratio "${CPU[bare-$mode]}" "${CPU[nginx-1]}") | |"
    echo "| bare proxy ($mode-thread) / nginx (auto), throughput | $(ratio "${RPS[bare-$mode]}" "${RPS[nginx-auto]}") | |"
  done
} >"$OUT"
echo "bench: results in ${OUT#"$ROOT"/}" >&2
