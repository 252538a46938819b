#!/usr/bin/env bash
# A real single-node KRaft Apache Kafka broker, run with `java` from jars resolved from Maven Central.
# No Docker engine and no Kafka tarball are needed: only Java 17+ and Maven.
#
# Usage: scripts/local-kafka.sh jars|up|down|stop|resume|status
#   jars    resolve the broker's jars into $KAFKA_JARS_DIR once (a stamp file makes re-runs free)
#   up      format a fresh log dir and start the broker in the background; prints the bootstrap
#           address on stdout (progress goes to stderr), so `bootstrap=$(scripts/local-kafka.sh up)`
#   down    stop the broker (SIGTERM, SIGKILL after 30 s) and remove its run dir
#   stop    stop the broker like `down`, but keep its run dir (config, data, logs)
#   resume  start the broker again on the run dir a `stop` kept (same cluster, same data)
#   status  exit 0 and print the bootstrap address if running, exit 3 if not
#
# Environment:
#   LOCAL_KAFKA_PORT             client port (default 9092)
#   LOCAL_KAFKA_CONTROLLER_PORT  KRaft controller port (default 9093)
#   LOCAL_KAFKA_LOG_LEVEL        root log4j2 level of the broker log (default WARN)
#   LOCAL_KAFKA_START_TIMEOUT_S  how long `up` waits for the broker (default 90)
#   LOCAL_KAFKA_JAVA_OPTS        extra JVM options for format and broker (split on whitespace)
#   LOCAL_KAFKA_JIT              "c1" (default): the JVM's quick compiler only; "full": C1 and C2
#   KAFKA_JARS_DIR               where the jars go (default .cache/kafka/<version>/libs)
#   KAFKA_VERSION, LOG4J_VERSION override the pin below (both together, and only to try another 4.x)
#
# Version pin: Kafka 4.1.2 (Scala 2.13 only), verified here with Java 17 and aiokafka 0.14 (produce,
# consume, consumer groups). 4.1.x rather than 3.9.x because Faust's own CI runs against 4.x in
# KRaft mode with aiokafka 0.14, 4.1.2 is the newest patch of that line, and 4.x drops ZooKeeper, so
# this broker is configured the way production clusters now are. Newer lines (4.2 to 4.4) are on
# Maven Central too but were not tried; the 3.9.x fallback was not needed.
# The log4j2 version must be the one that Kafka release was built with: kafka-server-4.1.2.pom
# declares log4j-api/log4j-core 2.25.3 (runtime), so 2.25.3 is pinned for the SLF4J binding too.
#
# Corrections to shared/kafka-from-maven.md, verified with 4.1.2 on this machine:
# - The logging backend is not entirely missing from the poms: kafka-server's pom already brings
#   log4j-api and log4j-core (runtime); only the SLF4J 1.x binding log4j-slf4j-impl is missing
#   (Kafka 4.1 is on slf4j-api 1.7.36). Without it the broker logs nothing at all (SLF4J NOP).
#   It resolves 46 jars, 43 MB, not ~50 MB.
# - The cluster id needs no JVM start (StorageTool random-uuid costs ~1 s): it is 16 random bytes
#   in URL-safe base64 without padding and not starting with '-', generated below in bash.
# - `log4j2.properties` works with log4j-core alone (no YAML/XML extras needed).
# - Start-up: format ~2.5 s, broker ~4.5 s on 2 idle cores, but 13-23 s when the cores are busy
#   (parallel test runs): "allow 60 s" is too tight, so `up` waits 90 s. Right as the note says:
#   `--standalone` with controller.quorum.voters is rejected; "Kafka Server started" is logged by
#   kafka.server.KafkaRaftServer, so that logger stays at INFO in the otherwise quiet config.
set -euo pipefail

readonly PINNED_KAFKA_VERSION=4.1.2
readonly PINNED_LOG4J_VERSION=2.25.3

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
readonly ROOT
KAFKA_VERSION="${KAFKA_VERSION:-$PINNED_KAFKA_VERSION}"
LOG4J_VERSION="${LOG4J_VERSION:-$PINNED_LOG4J_VERSION}"
KAFKA_JARS_DIR="${KAFKA_JARS_DIR:-$ROOT/.cache/kafka/$KAFKA_VERSION/libs}"
PORT="${LOCAL_KAFKA_PORT:-9092}"
CONTROLLER_PORT="${LOCAL_KAFKA_CONTROLLER_PORT:-9093}"
LOG_LEVEL="${LOCAL_KAFKA_LOG_LEVEL:-WARN}"
START_TIMEOUT_S="${LOCAL_KAFKA_START_TIMEOUT_S:-90}"
STOP_TIMEOUT_S=30
RUN_DIR="$ROOT/.run/kafka-$PORT"
PID_FILE="$RUN_DIR/kafka.pid"
STAMP_FILE="$KAFKA_JARS_DIR/.complete"
BOOTSTRAP="127.0.0.1:$PORT"

log() { printf 'local-kafka: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

# --- jars ---------------------------------------------------------------------------------------

cmd_jars() {
  local want="kafka_2.13-$KAFKA_VERSION log4j-$LOG4J_VERSION"
  if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$want" ]]; then
    return 0
  fi
  command -v mvn >/dev/null || die "mvn not found: install Maven 3.8+ (apt-get install maven)"
  mkdir -p "$(dirname "$KAFKA_JARS_DIR")"
  # Two callers (make, the pytest fixture) may race: serialise on a lock next to the jars dir.
  exec 9>"$KAFKA_JARS_DIR.lock"
  flock 9
  if [[ -f "$STAMP_FILE" && "$(cat "$STAMP_FILE")" == "$want" ]]; then
    exec 9>&-
    return 0
  fi
  log "resolving $want from Maven Central into $KAFKA_JARS_DIR"
  local tmp="$KAFKA_JARS_DIR.tmp.$$"
  rm -rf "$tmp"
  # Maven's output is kept in a file and shown only on failure (Maven 3.8 prints ANSI resets even
  # with -B -q).
  local mvn_log="$KAFKA_JARS_DIR.mvn.log"
  if ! mvn -B -Dstyle.color=never -f "$ROOT/scripts/kafka/pom.xml" \
    "-Dkafka.version=$KAFKA_VERSION" "-Dlog4j.version=$LOG4J_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime "-DoutputDirectory=$tmp" >"$mvn_log" 2>&1; then
    tail -n 40 "$mvn_log" >&2
    rm -rf "$tmp"
    die "mvn could not resolve the Kafka jars (full output in $mvn_log)"
  fi
  [[ -f "$tmp/kafka_2.13-$KAFKA_VERSION.jar" ]] || die "kafka_2.13-$KAFKA_VERSION.jar missing in $tmp"
  rm -rf "$KAFKA_JARS_DIR"
  mv "$tmp" "$KAFKA_JARS_DIR"
  printf '%s\n' "$want" >"$STAMP_FILE"
  exec 9>&-
  log "$(find "$KAFKA_JARS_DIR" -name '*.jar' | wc -l) jars in $KAFKA_JARS_DIR"
}

# --- helpers ------------------------------------------------------------------------------------

# The pid from the pid file if that process is alive and is our broker, else nothing (exit 1).
running_pid() {
  [[ -f "$PID_FILE" ]] || return 1
  local pid
  pid="$(cat "$PID_FILE")"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  kill -0 "$pid" 2>/dev/null || return 1
  # Guard against a recycled pid: the command line must be this broker's.
  tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "kafka.Kafka $RUN_DIR/server.properties" ||
    return 1
  printf '%s\n' "$pid"
}

# Microseconds since the epoch, for timings (bash 5's EPOCHREALTIME).
now_us() { printf '%s\n' "${EPOCHREALTIME/./}"; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# 16 random bytes, URL-safe base64 without padding, not starting with '-' (Kafka's Uuid rules).
new_cluster_id() {
  local id
  while :; do
    id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n')"
    [[ "$id" != -* ]] && break
  done
  printf '%s\n' "$id"
}

write_config() {
  mkdir -p "$RUN_DIR/data" "$RUN_DIR/tmp"
  cat >"$RUN_DIR/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$RUN_DIR/data
num.partitions=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
EOF
  # Quiet: WARN and up, plus the start/stop lines `up` waits for, into server.log in the run dir.
  cat >"$RUN_DIR/log4j2.properties" <<EOF
status = warn
name = local-kafka
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = $RUN_DIR/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = $LOG_LEVEL
rootLogger.appenderRef.file.ref = FILE
logger.raftserver.name = kafka.server.KafkaRaftServer
logger.raftserver.level = INFO
EOF
}

fail_start() {
  log "error: $1"
  log "--- tail of $RUN_DIR/server.log ---"
  tail -n 40 "$RUN_DIR/server.log" >&2 2>/dev/null || true
  log "--- tail of $RUN_DIR/stdout.log ---"
  tail -n 20 "$RUN_DIR/stdout.log" >&2 2>/dev/null || true
  exit 1
}

# --- up / down / status -------------------------------------------------------------------------

cmd_up() {
  local started_us
  started_us="$(now_us)"
  if running_pid >/dev/null; then
    log "already running (pid $(running_pid)) on $BOOTSTRAP"
    printf '%s\n' "$BOOTSTRAP"
    return 0
  fi
  command -v java >/dev/null || die "java not found: install a JDK 17+ (apt-get install openjdk-17-jre-headless)"
  local p
  for p in "$PORT" "$CONTROLLER_PORT"; do
    port_open "$p" && die "port $p on 127.0.0.1 is already in use; set LOCAL_KAFKA_PORT / LOCAL_KAFKA_CONTROLLER_PORT"
  done
  cmd_jars
  rm -rf "$RUN_DIR"
  write_config
  local -a jvm
  jvm_command
  # A new cluster id needs an empty log.dirs: the run dir was just removed.
  local cluster_id
  cluster_id="$(new_cluster_id)"
  log "formatting $RUN_DIR/data (cluster id $cluster_id)"
  "${jvm[@]}" kafka.tools.StorageTool format -t "$cluster_id" \
    -c "$RUN_DIR/server.properties" --ignore-formatted >"$RUN_DIR/format.log" 2>&1 ||
    {
      cat "$RUN_DIR/format.log" >&2
      die "formatting the log dir failed"
    }
  start_broker "$started_us"
}

# The java command line (into the caller's `jvm` array), with the jars on the class path.
jvm_command() {
  jvm=(java -Xmx512m -Xms128m -Djava.awt.headless=true "-Djava.io.tmpdir=$RUN_DIR/tmp"
    "-Dlog4j2.configurationFile=$RUN_DIR/log4j2.properties")
  # C1 only: this broker lives for one test run, demo or bench on a machine it shares. With C2 as
  # well, the JIT's compiler threads took 55-75% of the broker's CPU for the first minutes of
  # traffic (0.4-0.55 of a core, measured per thread in /proc during `make bench`), CPU taken
  # from the worker under test; C1 is done compiling within seconds. A long-lived broker wants C2.
  case "${LOCAL_KAFKA_JIT:-c1}" in
    c1) jvm+=(-XX:TieredStopAtLevel=1) ;;
    full) ;;
    *) die "LOCAL_KAFKA_JIT must be c1 or full, not '${LOCAL_KAFKA_JIT}'" ;;
  esac
  local -a extra_opts
  read -r -a extra_opts <<<"${LOCAL_KAFKA_JAVA_OPTS:-}"
  jvm+=("${extra_opts[@]}" -cp "$KAFKA_JARS_DIR/*")
}

# How many "Kafka Server started" lines the broker log has (0 without a log).
started_lines() {
  local n
  n="$(grep -c 'Kafka Server started' "$RUN_DIR/server.log" 2>/dev/null)" || true
  printf '%s\n' "${n:-0}"
}

# Start the broker on the formatted run dir and wait until it serves; $1: start time (now_us).
start_broker() {
  local started_us="$1"
  local -a jvm
  jvm_command
  log "starting Kafka $KAFKA_VERSION on $BOOTSTRAP (controller 127.0.0.1:$CONTROLLER_PORT)"
  # `resume` waits for a new "started" line: count the ones logged before this start.
  local seen
  seen="$(started_lines)"
  # setsid: own session, so a Ctrl-C in the caller's terminal does not reach the broker.
  setsid "${jvm[@]}" kafka.Kafka "$RUN_DIR/server.properties" \
    </dev/null >>"$RUN_DIR/stdout.log" 2>&1 &
  local pid=$!
  printf '%s\n' "$pid" >"$PID_FILE"

  local deadline=$((SECONDS + START_TIMEOUT_S))
  until (($(started_lines) > seen)) && port_open "$PORT"; do
    kill -0 "$pid" 2>/dev/null || fail_start "the broker exited during start-up"
    if ((SECONDS >= deadline)); then
      kill -KILL "$pid" 2>/dev/null || true
      fail_start "the broker did not start within ${START_TIMEOUT_S}s"
    fi
    sleep 0.2
  done
  local ms=$((($(now_us) - started_us) / 1000))
  log "started (pid $pid) in $((ms / 1000)).$(printf '%03d' $((ms % 1000)))s"
  printf '%s\n' "$BOOTSTRAP"
}

cmd_down() {
  stop_broker
  rm -rf "$RUN_DIR"
}

cmd_stop() {
  stop_broker
}

cmd_resume() {
  local started_us
  started_us="$(now_us)"
  if running_pid >/dev/null; then
    log "already running (pid $(running_pid)) on $BOOTSTRAP"
    printf '%s\n' "$BOOTSTRAP"
    return 0
  fi
  [[ -f "$RUN_DIR/server.properties" && -d "$RUN_DIR/data" ]] ||
    die "no kept run dir at $RUN_DIR: use \`up\` (or \`stop\` instead of \`down\`)"
  command -v java >/dev/null || die "java not found: install a JDK 17+ (apt-get install openjdk-17-jre-headless)"
  start_broker "$started_us"
}

stop_broker() {
  local pid
  if pid="$(running_pid)"; then
    log "stopping pid $pid"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + STOP_TIMEOUT_S))
    while kill -0 "$pid" 2>/dev/null; do
      if ((SECONDS >= deadline)); then
        log "still alive after ${STOP_TIMEOUT_S}s: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        break
      fi
      sleep 0.2
    done
    # Reap a zombie, if it is our own child (it is not when started by another invocation).
    wait "$pid" 2>/dev/null || true
  else
    log "not running on $BOOTSTRAP"
  fi
}

cmd_status() {
  local pid
  if pid="$(running_pid)"; then
    log "running (pid $pid) on $BOOTSTRAP, run dir $RUN_DIR"
    printf '%s\n' "$BOOTSTRAP"
  else
    log "not running on $BOOTSTRAP"
    return 3
  fi
}

main() {
  case "${1:-}" in
  jars) cmd_jars ;;
  up) cmd_up ;;
  down) cmd_down ;;
  stop) cmd_stop ;;
  resume) cmd_resume ;;
  status) cmd_status ;;
  *)
    printf 'usage: %s jars|up|down|stop|resume|status\n' "$0" >&2
    exit 2
    ;;
  esac
}

main "$@"
