# deploy/local/common.sh — shared settings and helpers for deploy/local/{up,down,kafka-topics}.
# Sourced, not executed. Everything lives under $CACHE (default ~/.cache/meterflow, override with
# MF_LOCAL_HOME); the Postgres data dir may live in /var/lib/meterflow instead (see pg_data_dir).

KAFKA_VERSION=4.1.1
CACHE=${MF_LOCAL_HOME:-$HOME/.cache/meterflow}
LIBS=$CACHE/kafka-$KAFKA_VERSION/libs
KDATA=$CACHE/kafka-data
KAFKA_PORT=9092 KAFKA_CONTROLLER_PORT=9093 PG_PORT=5432
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "error: $*" >&2; exit 1; }
is_root() { [ "$(id -u)" = 0 ]; }

# Is something accepting TCP connections on 127.0.0.1:$1?
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Run a command as the postgres OS user (postgres refuses to run as root).
as_pg() {
  if is_root; then (cd / && runuser -u postgres -- "$@"); else "$@"; fi
}

# Postgres data dir: an existing one wins; otherwise $CACHE/pg-data if the postgres user can reach
# it, else /var/lib/meterflow/pg-data (e.g. when $HOME is /root with mode 700).
pg_data_dir() {
  local d
  for d in "$CACHE/pg-data" /var/lib/meterflow/pg-data; do
    [ -f "$d/PG_VERSION" ] && { echo "$d"; return; }
  done
  if ! is_root || { [ -d "$CACHE" ] && runuser -u postgres -- test -x "$CACHE" 2>/dev/null; }; then
    echo "$CACHE/pg-data"
  else
    echo /var/lib/meterflow/pg-data
  fi
}

# Postgres binaries: the version the data dir was made with, else the newest installed.
pg_bin_dir() {
  local data=$1
  if [ -f "$data/PG_VERSION" ]; then echo "/usr/lib/postgresql/$(cat "$data/PG_VERSION")/bin"
  else ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; fi
}

# Pid of our Kafka broker if it is running, else nothing (exit 1).
kafka_pid() {
  local pid
  pid=$(cat "$KDATA/kafka.pid" 2>/dev/null) || return 1
  [ -n "$pid" ] && grep -qa 'kafka.Kafka' "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

# Run a Kafka CLI class with the cached jars, logging WARN+ to stderr.
kafka_tool() {
  [ -d "$LIBS" ] || die "Kafka jars not found in $LIBS; run deploy/local/up first"
  java -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$HERE/tools-log4j2.properties" \
    -cp "$LIBS/*" "$@"
}
