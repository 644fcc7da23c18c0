#!/usr/bin/env bash
# slurm/cluster.sh: install, start, check and stop a real single-node SLURM cluster on this
# machine (Debian, root, no systemd) for development and CI.
#
#   bash slurm/cluster.sh install   # apt-get install the packages that are missing
#   bash slurm/cluster.sh up        # install if missing, render configs, start daemons, wait ready
#   bash slurm/cluster.sh status    # daemons, controller, node state, queue (exit 1 if not usable)
#   bash slurm/cluster.sh down      # stop the daemons by the PIDs in their pid files
#
# Env knobs: FAKE_GPUS=N (default 2; 0 = none), MAX_ARRAY_SIZE (default 1001),
# SLURM_WITH_DBD=1 (slurmdbd + mariadb so sacct works), CLUSTER_WAIT_S (default 60).
# An unset knob keeps the value of the running configuration (see current_setting).
# Configs are rendered from slurm/*.conf.in into /etc/slurm; logs go to /var/log/slurm.
set -euo pipefail
shopt -u patsub_replacement 2>/dev/null || true  # bash 5.2: "&" in a ${x//a/b} value stays literal

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF_DIR=/etc/slurm
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
WAIT_S=${CLUSTER_WAIT_S:-60}

# Knobs left unset keep what the current /etc/slurm/slurm.conf uses, so a plain `up` by one
# developer never restarts the shared cluster that another set up differently; with no config
# yet they take the defaults (FAKE_GPUS=2, MAX_ARRAY_SIZE=1001, SLURM_WITH_DBD=0).
current_setting() {
    local conf=$CONF_DIR/slurm.conf
    [[ -r $conf ]] || return 1
    case $1 in
    FAKE_GPUS) grep -q '^GresTypes=gpu' "$conf" &&
        sed -n 's/^NodeName=.* Gres=gpu:\([0-9]*\).*/\1/p' "$conf" | grep . || echo 0 ;;
    MAX_ARRAY_SIZE) sed -n 's/^MaxArraySize=\([0-9]*\)$/\1/p' "$conf" | grep . ;;
    SLURM_WITH_DBD) grep -q '^AccountingStorageType=accounting_storage/slurmdbd' "$conf" &&
        echo 1 || echo 0 ;;
    esac
}
FAKE_GPUS=${FAKE_GPUS:-$(current_setting FAKE_GPUS || echo 2)}
MAX_ARRAY_SIZE=${MAX_ARRAY_SIZE:-$(current_setting MAX_ARRAY_SIZE || echo 1001)}
SLURM_WITH_DBD=${SLURM_WITH_DBD:-$(current_setting SLURM_WITH_DBD || echo 0)}

say() { echo "cluster: $*"; }
die() {
    echo "cluster: ERROR: $*" >&2
    exit 1
}

need_root() {
    [[ $(id -u) == 0 ]] || die "'$1' must run as root (the daemons run as root here); try: sudo bash $0 $1"
}

check_env() {
    [[ $FAKE_GPUS =~ ^[0-9]+$ ]] && ((FAKE_GPUS <= 16)) ||
        die "FAKE_GPUS='$FAKE_GPUS': expected an integer 0..16 (number of fake GPUs on the node)"
    [[ $MAX_ARRAY_SIZE =~ ^[0-9]+$ ]] && ((MAX_ARRAY_SIZE >= 1 && MAX_ARRAY_SIZE <= 4000001)) ||
        die "MAX_ARRAY_SIZE='$MAX_ARRAY_SIZE': expected an integer 1..4000001 (SLURM's MaxArraySize)"
    [[ $SLURM_WITH_DBD == 0 || $SLURM_WITH_DBD == 1 ]] ||
        die "SLURM_WITH_DBD='$SLURM_WITH_DBD': expected 0 or 1"
    [[ $WAIT_S =~ ^[0-9]+$ ]] || die "CLUSTER_WAIT_S='$WAIT_S': expected a number of seconds"
}

# Print the PID recorded in pid file $1 if that process is alive and is named $2.
# The name check guards against a stale pid file whose PID was reused by another program.
pid_alive() {
    local file=$1 comm=$2 pid
    [[ -s $file && -r $file ]] || return 1
    pid=$(tr -dc '0-9' <"$file")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

# wait_until DESCRIPTION SECONDS COMMAND...: poll COMMAND every 0.5 s; return 1 on timeout.
wait_until() {
    local desc=$1 secs=$2 deadline
    shift 2
    deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            echo "cluster: timed out after ${secs} s waiting for: $desc" >&2
            return 1
        fi
        sleep 0.5
    done
}

log_tail() {
    [[ -r $1 ]] && { echo "--- last lines of $1:" >&2; tail -n 15 "$1" >&2; } || true
}

# ---------------------------------------------------------------------------- install

wanted_packages() {
    echo slurmctld slurmd slurm-client munge
    [[ $SLURM_WITH_DBD == 1 ]] && echo slurmdbd mariadb-server mariadb-client
    return 0
}

missing_packages() {
    local p
    for p in $(wanted_packages); do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' ||
            echo "$p"
    done
}

cmd_install() {
    need_root install
    check_env
    local missing policy_made=0
    missing=$(missing_packages | tr '\n' ' ')
    if [[ -z ${missing// /} ]]; then
        say "packages already installed: $(wanted_packages | tr '\n' ' ')"
        return 0
    fi
    command -v apt-get >/dev/null || die "apt-get not found: install by hand: $missing"
    mkdir -p "$LOG_DIR"
    # Keep package scripts from starting daemons: this script starts them itself, in order.
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        policy_made=1
    fi
    say "installing: $missing(log: $LOG_DIR/install.log)"
    local t0=$SECONDS rc=0
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
        >>"$LOG_DIR/install.log" 2>&1 || rc=$?
    if ((rc != 0)); then
        say "apt-get install failed (rc $rc); running apt-get update and retrying"
        rc=0
        # shellcheck disable=SC2086
        { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
            --no-install-recommends $missing; } >>"$LOG_DIR/install.log" 2>&1 || rc=$?
    fi
    ((policy_made)) && rm -f /usr/sbin/policy-rc.d
    if ((rc != 0)); then
        log_tail "$LOG_DIR/install.log"
        die "apt-get install $missing failed (rc $rc); see $LOG_DIR/install.log"
    fi
    say "installed in $((SECONDS - t0)) s: $(slurmctld -V 2>/dev/null || echo '?')"
}

# ---------------------------------------------------------------------------- configs

# The node line from `slurmd -C`, RealMemory lowered so slurmd never reports less than configured.
node_line() {
    local line mem low
    line=$(slurmd -C 2>/dev/null | grep -m1 '^NodeName=') ||
        die "'slurmd -C' printed no NodeName line; is slurmd installed?"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    [[ -n $mem ]] || die "'slurmd -C' printed no RealMemory: $line"
    low=$((mem / 20 > 256 ? mem - mem / 20 : mem - 256))
    ((low > 0)) || low=$mem
    line=$(sed "s/RealMemory=[0-9]*/RealMemory=$low/" <<<"$line")
    ((FAKE_GPUS > 0)) && line+=" Gres=gpu:$FAKE_GPUS"
    echo "$line State=UNKNOWN"
}

# render TEMPLATE OUT KEY=VALUE...: replace each @KEY@ in TEMPLATE by VALUE.
render() {
    local tmpl=$1 out=$2 text kv
    shift 2
    [[ -r $tmpl ]] || die "template $tmpl is missing"
    text=$(<"$tmpl")
    for kv in "$@"; do
        text=${text//@${kv%%=*}@/${kv#*=}}
    done
    [[ $text != *@[A-Z_]*@* ]] || die "template $tmpl: unreplaced placeholder left: $(grep -o '@[A-Z_]*@' <<<"$text" | sort -u | tr '\n' ' ')"
    printf '%s\n' "$text" >"$out"
}

CHANGED=0

# Install $1 as $2 (mode $3) if it differs; set CHANGED=1 when it did.
install_if_changed() {
    local new=$1 dest=$2 mode=$3
    if [[ -f $dest ]] && cmp -s "$new" "$dest"; then
        rm -f "$new"
        return 0
    fi
    chmod "$mode" "$new"
    mv -f "$new" "$dest"
    say "wrote $dest"
    CHANGED=1
}

db_pass() {
    local f=$CONF_DIR/.slurmdbd-db-pass
    if [[ ! -s $f ]]; then
        (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$f")
    fi
    cat "$f"
}

# Render all configs into /etc/slurm; CHANGED=1 when any file changed.
write_configs() {
    local host tmp accounting gres_types="" files node pass
    host=$(hostname -s)
    node=$(node_line)
    mkdir -p "$CONF_DIR"
    tmp=$(mktemp -d)
    if [[ $SLURM_WITH_DBD == 1 ]]; then
        accounting=$'AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\nJobAcctGatherType=jobacct_gather/linux\nJobAcctGatherFrequency=30'
    else
        accounting=$'# No slurmdbd: sacct has no data (SLURM_WITH_DBD=1 adds it).\nAccountingStorageType=accounting_storage/none\nJobAcctGatherType=jobacct_gather/none'
    fi
    ((FAKE_GPUS > 0)) && gres_types="GresTypes=gpu"
    render "$HERE/slurm.conf.in" "$tmp/slurm.conf" "HOST=$host" "MAX_ARRAY_SIZE=$MAX_ARRAY_SIZE" \
        "ACCOUNTING=$accounting" "GRES_TYPES=$gres_types" "NODE_LINE=$node"
    install_if_changed "$tmp/slurm.conf" "$CONF_DIR/slurm.conf" 644
    if ((FAKE_GPUS > 0)); then
        ((FAKE_GPUS == 1)) && files=/dev/tty0 || files="/dev/tty[0-$((FAKE_GPUS - 1))]"
        local i
        for ((i = 0; i < FAKE_GPUS; i++)); do
            [[ -e /dev/tty$i ]] || die "FAKE_GPUS=$FAKE_GPUS needs /dev/tty$i as a fake GPU device file; it does not exist (use fewer)"
        done
        render "$HERE/gres.conf.in" "$tmp/gres.conf" "HOST=$host" "N=$FAKE_GPUS" "FILES=$files"
        install_if_changed "$tmp/gres.conf" "$CONF_DIR/gres.conf" 644
    elif [[ -e $CONF_DIR/gres.conf ]]; then
        rm -f "$CONF_DIR/gres.conf"
        say "removed $CONF_DIR/gres.conf (FAKE_GPUS=0)"
        CHANGED=1
    fi
    if [[ $SLURM_WITH_DBD == 1 ]]; then
        pass=$(db_pass)
        render "$HERE/slurmdbd.conf.in" "$tmp/slurmdbd.conf" "DB_PASS=$pass"
        install_if_changed "$tmp/slurmdbd.conf" "$CONF_DIR/slurmdbd.conf" 600
    fi
    rm -rf "$tmp"
}

# ---------------------------------------------------------------------------- daemons

start_munge() {
    local pid
    if pid=$(pid_alive /run/munge/munged.pid munged); then
        say "munged already running (pid $pid)"
    else
        mkdir -p /run/munge
        chown munge:munge /run/munge
        chmod 0755 /run/munge
        if [[ ! -s /etc/munge/munge.key ]]; then
            say "creating /etc/munge/munge.key"
            runuser -u munge -- /usr/sbin/mungekey --create --keyfile=/etc/munge/munge.key
        fi
        say "starting munged"
        runuser -u munge -- /usr/sbin/munged ||
            { log_tail /var/log/munge/munged.log; die "munged failed to start"; }
    fi
    wait_until "munge -n | unmunge" 10 bash -c 'munge -n | unmunge' ||
        { log_tail /var/log/munge/munged.log; die "munge credentials do not round-trip"; }
}

start_mariadb() {
    local pid
    if pid=$(pid_alive /run/mysqld/mysqld.pid mariadbd); then
        say "mariadbd already running (pid $pid)"
    else
        mkdir -p /run/mysqld
        chown mysql:mysql /run/mysqld
        if [[ ! -d /var/lib/mysql/mysql ]]; then
            say "initialising /var/lib/mysql"
            mariadb-install-db --user=mysql >>"$LOG_DIR/mariadb.log" 2>&1 ||
                { log_tail "$LOG_DIR/mariadb.log"; die "mariadb-install-db failed"; }
        fi
        say "starting mariadbd"
        setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid \
            --socket=/run/mysqld/mysqld.sock --log-error="$LOG_DIR/mariadb.log" \
            </dev/null >/dev/null 2>&1 &
    fi
    wait_until "mariadb answers" 30 mariadb-admin --socket=/run/mysqld/mysqld.sock ping ||
        { log_tail "$LOG_DIR/mariadb.log"; die "mariadbd did not start"; }
    mariadb --socket=/run/mysqld/mysqld.sock -e "
        CREATE DATABASE IF NOT EXISTS slurm_acct_db;
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$(db_pass)';
        ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$(db_pass)';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" ||
        die "could not create the slurm_acct_db database/user in mariadb"
}

start_slurmdbd() {
    local pid
    if pid=$(pid_alive "$RUN_DIR/slurmdbd.pid" slurmdbd); then
        say "slurmdbd already running (pid $pid)"
    else
        say "starting slurmdbd"
        slurmdbd || { log_tail "$LOG_DIR/slurmdbd.log"; die "slurmdbd failed to start"; }
    fi
    wait_until "slurmdbd answers sacctmgr" 30 sacctmgr -n list cluster ||
        { log_tail "$LOG_DIR/slurmdbd.log"; die "slurmdbd does not answer"; }
    if ! sacctmgr -n -P list cluster format=cluster | grep -qx brainhpc; then
        sacctmgr -i add cluster brainhpc >/dev/null || die "sacctmgr add cluster brainhpc failed"
        say "registered cluster brainhpc in slurmdbd"
    fi
}

ctld_up() { scontrol ping 2>/dev/null | grep -q ' is UP'; }

start_slurmctld() {
    local pid
    if pid=$(pid_alive "$RUN_DIR/slurmctld.pid" slurmctld); then
        say "slurmctld already running (pid $pid)"
    else
        say "starting slurmctld"
        slurmctld || { log_tail "$LOG_DIR/slurmctld.log"; die "slurmctld failed to start"; }
    fi
    wait_until "scontrol ping says UP" "$WAIT_S" ctld_up ||
        { log_tail "$LOG_DIR/slurmctld.log"; die "slurmctld is not answering (scontrol ping)"; }
}

node_state() { sinfo -h -N -n "$(hostname -s)" -o '%T' 2>/dev/null | head -n1; }

node_ready() { [[ $(node_state) =~ ^(idle|mixed|allocated|completing)$ ]]; }

start_slurmd() {
    local pid host state deadline resumed=0
    host=$(hostname -s)
    if pid=$(pid_alive "$RUN_DIR/slurmd.pid" slurmd); then
        say "slurmd already running (pid $pid)"
    else
        say "starting slurmd"
        slurmd || { log_tail "$LOG_DIR/slurmd.log"; die "slurmd failed to start"; }
    fi
    deadline=$((SECONDS + WAIT_S))
    until node_ready; do
        state=$(node_state)
        if [[ $state =~ drain|down|fail ]] && [[ $state != *'*' ]] && ((SECONDS >= resumed)); then
            say "node $host is '$state' ($(scontrol show node "$host" | sed -n 's/.*Reason=//p')); resuming"
            scontrol update nodename="$host" state=resume || true
            resumed=$((SECONDS + 5))
        fi
        if ((SECONDS >= deadline)); then
            log_tail "$LOG_DIR/slurmd.log"
            scontrol show node "$host" >&2 || true
            die "node $host not usable after ${WAIT_S} s (state '$state')"
        fi
        sleep 0.5
    done
}

# stop_daemon NAME PIDFILE COMM: SIGTERM the recorded PID, wait up to 20 s, then SIGKILL.
stop_daemon() {
    local name=$1 file=$2 comm=$3 pid i
    if ! pid=$(pid_alive "$file" "$comm"); then
        say "$name not running"
        rm -f "$file"
        return 0
    fi
    say "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 40; i++)); do
        [[ -d /proc/$pid ]] || break
        sleep 0.5
    done
    if [[ -d /proc/$pid ]]; then
        say "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    rm -f "$file"
}

stop_slurm_daemons() {
    stop_daemon slurmd "$RUN_DIR/slurmd.pid" slurmd
    stop_daemon slurmctld "$RUN_DIR/slurmctld.pid" slurmctld
}

# ---------------------------------------------------------------------------- commands

cmd_up() {
    need_root up
    check_env
    local t0=$SECONDS
    cmd_install
    mkdir -p "$LOG_DIR" "$RUN_DIR" /var/spool/slurmctld /var/spool/slurmd
    write_configs
    if ((CHANGED)) && { pid_alive "$RUN_DIR/slurmctld.pid" slurmctld ||
        pid_alive "$RUN_DIR/slurmd.pid" slurmd; } >/dev/null; then
        say "configuration changed: restarting slurmctld and slurmd"
        stop_slurm_daemons
    fi
    start_munge
    if [[ $SLURM_WITH_DBD == 1 ]]; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurmctld
    start_slurmd
    say "cluster up in $((SECONDS - t0)) s (node $(hostname -s): $(node_state);" \
        "fake GPUs: $FAKE_GPUS; MaxArraySize: $MAX_ARRAY_SIZE; slurmdbd: $SLURM_WITH_DBD)"
    sinfo
}

cmd_down() {
    need_root down
    local n
    if ctld_up; then
        n=$(squeue -h 2>/dev/null | wc -l)
        ((n == 0)) || say "warning: $n job(s) still queued/running; they stay in the saved state and continue after 'up'"
    fi
    stop_slurm_daemons
    stop_daemon slurmdbd "$RUN_DIR/slurmdbd.pid" slurmdbd
    stop_daemon mariadbd /run/mysqld/mysqld.pid mariadbd
    stop_daemon munged /run/munge/munged.pid munged
    say "cluster down"
}

cmd_status() {
    local ok=0 pid name file comm
    for entry in "munged:/run/munge/munged.pid:munged" \
        "slurmctld:$RUN_DIR/slurmctld.pid:slurmctld" "slurmd:$RUN_DIR/slurmd.pid:slurmd" \
        "slurmdbd:$RUN_DIR/slurmdbd.pid:slurmdbd" "mariadbd:/run/mysqld/mysqld.pid:mariadbd"; do
        IFS=: read -r name file comm <<<"$entry"
        if pid=$(pid_alive "$file" "$comm"); then
            say "$name running (pid $pid)"
        else
            say "$name stopped"
        fi
    done
    if ! command -v sinfo >/dev/null; then
        say "SLURM is not installed (no sinfo on PATH): run 'bash $0 up'"
        return 1
    fi
    if ctld_up; then
        say "controller: $(scontrol ping | head -n1)"
        sinfo
        say "queue: $(squeue -h | wc -l) job(s)"
        node_ready || { say "node $(hostname -s) is not usable (state '$(node_state)')"; ok=1; }
    else
        say "controller: not answering (scontrol ping): run 'bash $0 up'"
        ok=1
    fi
    return $ok
}

case ${1:-} in
install) cmd_install ;;
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
    echo "usage: bash $0 {install|up|down|status}" >&2
    echo "  env: FAKE_GPUS=N (default 2) MAX_ARRAY_SIZE=N (default 1001) SLURM_WITH_DBD=0|1 CLUSTER_WAIT_S=60" >&2
    exit 2
    ;;
esac
