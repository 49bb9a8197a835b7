#!/usr/bin/env bash
# Make sure the real servers the test suite talks to are installed, running and set up.
#
# Idempotent: run it as often as you like; it only does what is missing and says what it did.
# Today that is MariaDB (the MySQL tests): installed from Debian's packages when absent (root
# only), started when nothing answers, and given the test user that may create and drop the
# `ctrl_test_*` databases; and pebble + pebble-challtestsrv (the certificate tests' ACME CA and
# DNS server, installed from Debian's `pebble` package when absent, root only; the tests start
# them themselves on free ports).
#
# Settings (environment):
#   CTRL_MYSQL_PORT      TCP port of MariaDB on 127.0.0.1       (default 3306)
#   CTRL_MYSQL_USER      the test user                          (default ctrl)
#   CTRL_MYSQL_PASSWORD  its password                           (default ctrl)
#   CTRL_MYSQL_SOCKET    unix socket root logs in through       (default /run/mysqld/mysqld.sock)
#   CTRL_SKIP_SERVERS=1  do nothing (you manage the servers; point CTRL_TEST_MYSQL_URL at yours)
#
# Exit status: 0 when everything is ready, 1 with a message saying what is not.
set -euo pipefail

MYSQL_PORT="${CTRL_MYSQL_PORT:-3306}"
MYSQL_USER="${CTRL_MYSQL_USER:-ctrl}"
MYSQL_PASSWORD="${CTRL_MYSQL_PASSWORD:-ctrl}"
MYSQL_SOCKET="${CTRL_MYSQL_SOCKET:-/run/mysqld/mysqld.sock}"
MARIADBD="${CTRL_MARIADBD:-/usr/sbin/mariadbd}"
PIDFILE=/run/mysqld/ctrl-mariadbd.pid
ERROR_LOG=/var/log/mysql/ctrl-mariadbd.log
READY_TIMEOUT=30

say() { printf 'ensure-servers: %s\n' "$*"; }
fail() {
    printf 'ensure-servers: ERROR: %s\n' "$*" >&2
    exit 1
}
is_root() { [ "$(id -u)" -eq 0 ]; }

if [ "${CTRL_SKIP_SERVERS:-0}" = "1" ]; then
    say "CTRL_SKIP_SERVERS=1: leaving the servers alone"
    exit 0
fi

# -- MariaDB: installed ----------------------------------------------------------------------
if [ ! -x "$MARIADBD" ] && ! command -v mariadbd >/dev/null 2>&1; then
    is_root || fail "MariaDB is not installed and we are not root: install mariadb-server \
(apt-get install mariadb-server), or set CTRL_SKIP_SERVERS=1 and CTRL_TEST_MYSQL_URL"
    say "MariaDB is not installed: installing mariadb-server"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q mariadb-server
    say "installed mariadb-server"
fi
[ -x "$MARIADBD" ] || MARIADBD="$(command -v mariadbd)"

# -- MariaDB: running --------------------------------------------------------------------------
# `mariadb-admin ping` exits 0 when a server answers, even if it refuses the login, but not
# when it refuses the client's host (error 1130, a fresh server has no user for 127.0.0.1):
# a port that accepts connections counts as an answer too.
mariadb_answers() {
    mariadb-admin --connect-timeout=2 --protocol=tcp -h 127.0.0.1 -P "$MYSQL_PORT" ping \
        >/dev/null 2>&1 && return 0
    if [ "$MYSQL_PORT" = "3306" ] && [ -S "$MYSQL_SOCKET" ] &&
        mariadb-admin --connect-timeout=2 --socket="$MYSQL_SOCKET" ping >/dev/null 2>&1; then
        return 0
    fi
    (exec 3<>"/dev/tcp/127.0.0.1/$MYSQL_PORT") 2>/dev/null
}

if mariadb_answers; then
    say "MariaDB already answers on 127.0.0.1:$MYSQL_PORT"
else
    is_root || fail "nothing answers on 127.0.0.1:$MYSQL_PORT and we are not root: start \
MariaDB yourself, or set CTRL_MYSQL_PORT to where it listens"
    if [ ! -d /var/lib/mysql/mysql ]; then
        say "initialising the MariaDB data directory /var/lib/mysql"
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
    fi
    mkdir -p /run/mysqld /var/log/mysql
    chown mysql:mysql /run/mysqld /var/log/mysql
    extra=()
    [ "$MYSQL_PORT" = "3306" ] || extra+=("--port=$MYSQL_PORT")
    say "starting MariaDB ($MARIADBD, port $MYSQL_PORT, log $ERROR_LOG)"
    start-stop-daemon --start --oknodo --background --make-pidfile --pidfile "$PIDFILE" \
        --exec "$MARIADBD" -- --user=mysql --log-error="$ERROR_LOG" "${extra[@]}"
    waited=0
    until mariadb_answers; do
        if [ "$waited" -ge $((READY_TIMEOUT * 5)) ]; then
            tail -n 20 "$ERROR_LOG" >&2 2>/dev/null || true
            fail "MariaDB did not answer on 127.0.0.1:$MYSQL_PORT within ${READY_TIMEOUT} s \
(log: $ERROR_LOG)"
        fi
        sleep 0.2
        waited=$((waited + 1))
    done
    say "MariaDB is up on 127.0.0.1:$MYSQL_PORT (pid $(cat "$PIDFILE" 2>/dev/null || echo '?'))"
fi

# -- MariaDB: the test user ---------------------------------------------------------------------
user_works() {
    MYSQL_PWD="$MYSQL_PASSWORD" mariadb --connect-timeout=5 --protocol=tcp -h 127.0.0.1 \
        -P "$MYSQL_PORT" -u "$MYSQL_USER" -e "SELECT 1" >/dev/null 2>&1
}

if user_works; then
    say "test user '$MYSQL_USER' can log in"
else
    is_root || fail "user '$MYSQL_USER' cannot log in on 127.0.0.1:$MYSQL_PORT and we are not \
root (root creates it through the unix socket)"
    # Tests create and drop their own databases (`ctrl_test_*`), hence ALL on *.*: this is a
    # throwaway server for tests, never a production one.
    sql="
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
CREATE USER IF NOT EXISTS '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
ALTER USER '$MYSQL_USER'@'127.0.0.1' IDENTIFIED BY '$MYSQL_PASSWORD';
ALTER USER '$MYSQL_USER'@'localhost' IDENTIFIED BY '$MYSQL_PASSWORD';
GRANT ALL PRIVILEGES ON *.* TO '$MYSQL_USER'@'127.0.0.1';
GRANT ALL PRIVILEGES ON *.* TO '$MYSQL_USER'@'localhost';
FLUSH PRIVILEGES;"
    mariadb --socket="$MYSQL_SOCKET" -u root -e "$sql" ||
        fail "could not create user '$MYSQL_USER' as root through $MYSQL_SOCKET"
    user_works || fail "user '$MYSQL_USER' still cannot log in on 127.0.0.1:$MYSQL_PORT"
    say "created test user '$MYSQL_USER'@'127.0.0.1' and @'localhost' (ALL PRIVILEGES)"
fi

# -- pebble: installed (the tests start it) -----------------------------------------------------
if command -v pebble >/dev/null 2>&1 && command -v pebble-challtestsrv >/dev/null 2>&1; then
    say "pebble and pebble-challtestsrv are installed"
else
    is_root || fail "pebble or pebble-challtestsrv is not installed and we are not root: \
install the pebble package (apt-get install pebble)"
    say "pebble is not installed: installing pebble"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q pebble
    say "installed pebble"
fi

say "ready: mysql+pymysql://$MYSQL_USER:***@127.0.0.1:$MYSQL_PORT"
