#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for tests of sbatch scripts.
#
#   tests/slurm/cluster.sh install          apt-get install munge + slurmctld + slurmd + slurm-client (skips what is there)
#   tests/slurm/cluster.sh start            write slurm.conf, start munged, slurmctld, slurmd; wait until the node is idle
#   tests/slurm/cluster.sh status           daemons, sinfo, squeue
#   tests/slurm/cluster.sh conf             print the slurm.conf 'start' would write (no root needed)
#   tests/slurm/cluster.sh stop             stop the daemons this script starts
#   tests/slurm/cluster.sh install start    several commands run in order
#
# Needs root. Debian 12 (SLURM 22.05). Works without systemd (containers): daemons are started directly.
#
# Environment:
#   CLBD_SLURM_DIR      state, spool, pid and log files (default /var/lib/clbd-slurm)
#   CLBD_SLURM_CPUS     CPUs announced for the node (default: number of cores); may exceed the cores
#   CLBD_SLURM_TIMEOUT  seconds to wait for the node to become idle (default 60)
#   SLURM_CONF          where slurm.conf goes (default /etc/slurm/slurm.conf, where every client looks)
set -euo pipefail

SLURM_DIR=${CLBD_SLURM_DIR:-/var/lib/clbd-slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${CLBD_SLURM_TIMEOUT:-60}
PACKAGES=(munge slurm-client slurmctld slurmd)
MUNGE_KEY=/etc/munge/munge.key
MUNGE_SOCKET_DIR=/run/munge
MARKER="# Written by clbd tests/slurm/cluster.sh"
NODE=$(hostname -s)

log() { echo "[cluster.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts munged, slurmctld, slurmd)"
}

# ---------------------------------------------------------------- install

missing_packages() {
    local pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
    done
}

# Containers without an init system: package scripts must not try to start daemons (slurmctld would fail
# without a config and make apt-get fail). policy-rc.d exit 101 = "action forbidden"; removed afterwards.
with_services_blocked() {
    local policy=/usr/sbin/policy-rc.d created=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created=1
    fi
    local rc=0
    "$@" || rc=$?
    if [[ $created -eq 1 ]]; then rm -f "$policy"; fi
    return $rc
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "$@"
}

cmd_install() {
    require_root
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    if [[ -z ${missing// /} ]]; then
        log "install: ${PACKAGES[*]} already installed ($(slurmctld -V))"
        return 0
    fi
    command -v apt-get >/dev/null || die "install: apt-get not found; install ${missing} by hand"
    log "install: installing ${missing}"
    local start=$SECONDS
    # shellcheck disable=SC2086
    if ! with_services_blocked apt_install $missing; then
        log "install: apt-get install failed; running apt-get update and trying again"
        local t_update=$SECONDS
        DEBIAN_FRONTEND=noninteractive apt-get update -q || die "install: apt-get update failed"
        log "install: apt-get update took $((SECONDS - t_update)) s"
        # shellcheck disable=SC2086
        with_services_blocked apt_install $missing || die "install: apt-get install ${missing} failed"
    fi
    log "install: done in $((SECONDS - start)) s ($(slurmctld -V))"
}

# ---------------------------------------------------------------- config

node_cpus() {
    if [[ -n ${CLBD_SLURM_CPUS:-} ]]; then
        [[ $CLBD_SLURM_CPUS =~ ^[1-9][0-9]*$ ]] || die "CLBD_SLURM_CPUS must be a positive integer, got '$CLBD_SLURM_CPUS'"
        echo "$CLBD_SLURM_CPUS"
    else
        # GNU nproc answers OMP_NUM_THREADS / OMP_THREAD_LIMIT when set (the test suite sets OMP_NUM_THREADS=1),
        # which would announce one CPU and leave every two-task job pending for ever.
        env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
    fi
}

# MiB announced to SLURM: MemTotal less 5% (at least 512 MiB) so slurmd never finds less than configured.
node_memory_mb() {
    local total_kb total_mb margin
    total_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    total_mb=$((total_kb / 1024))
    margin=$((total_mb / 20))
    ((margin < 512)) && margin=512
    ((total_mb - margin > 256)) || die "too little memory for a node: ${total_mb} MiB"
    echo $((total_mb - margin))
}

render_conf() {
    cat <<EOF
$MARKER; rewritten by each 'start'. Do not edit.
ClusterName=clbd
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire+1 s before it may start again (default 120 s); 10 s keeps requeue tests short.
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# No slurmdbd, hence no sacct: finished jobs stay visible to 'scontrol show job' for MinJobAge seconds,
# and every job end (each requeue included) is appended to the job completion log.
JobCompType=jobcomp/filetxt
JobCompLoc=${SLURM_DIR}/log/jobcomp.log
MinJobAge=86400
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Scheduling every second: a requeued job and a job queued behind another start quickly.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
ReturnToService=2
KillWait=10
InactiveLimit=0
MailProg=/bin/true
# Node values below win over what slurmd detects (CLBD_SLURM_CPUS may exceed the cores).
SlurmdParameters=config_overrides
StateSaveLocation=${SLURM_DIR}/state
SlurmdSpoolDir=${SLURM_DIR}/spool
SlurmctldPidFile=${SLURM_DIR}/run/slurmctld.pid
SlurmdPidFile=${SLURM_DIR}/run/slurmd.pid
SlurmctldLogFile=${SLURM_DIR}/log/slurmctld.log
SlurmdLogFile=${SLURM_DIR}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=$(node_cpus) RealMemory=$(node_memory_mb) State=UNKNOWN
# OverSubscribe=FORCE:4: up to 4 jobs share a core, so tests of several workers do not queue behind each other.
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

# Writes slurm.conf; returns 0 when its content changed. Refuses to replace a slurm.conf it did not write.
write_conf() {
    local new
    new=$(render_conf)
    if [[ -e $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away or set SLURM_CONF to another path"
    fi
    if [[ -e $CONF ]] && [[ $(cat "$CONF") == "$new" ]]; then
        return 1
    fi
    mkdir -p "$(dirname "$CONF")"
    printf '%s\n' "$new" >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    log "wrote $CONF"
    return 0
}

# ---------------------------------------------------------------- daemons

pid_alive() { # pidfile
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

munge_works() {
    command -v munge >/dev/null && munge -n 2>/dev/null | unmunge >/dev/null 2>&1
}

start_munged() {
    if munge_works; then
        log "munged already running"
        return 0
    fi
    if [[ ! -s $MUNGE_KEY ]]; then
        log "creating $MUNGE_KEY"
        mkdir -p "$(dirname "$MUNGE_KEY")"
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_KEY" --force
        else
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge "$(dirname "$MUNGE_KEY")" "$MUNGE_KEY"
    chmod 700 "$(dirname "$MUNGE_KEY")"
    chmod 400 "$MUNGE_KEY"
    install -d -o munge -g munge -m 755 "$MUNGE_SOCKET_DIR"
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    rm -f "$MUNGE_SOCKET_DIR/munged.pid"
    # --force: start despite a stale socket left by a killed munged.
    runuser -u munge -- /usr/sbin/munged --force 9>&- # 9: the lock of main(); a daemon must not keep it
    local i
    for i in $(seq 1 50); do
        munge_works && { log "munged started"; return 0; }
        sleep 0.1
    done
    tail -n 30 /var/log/munge/munged.log >&2 || true
    die "munged did not answer within 5 s"
}

start_slurm_daemons() {
    install -d -m 755 "$SLURM_DIR" "$SLURM_DIR/state" "$SLURM_DIR/spool" "$SLURM_DIR/run" "$SLURM_DIR/log"
    if pid_alive "$SLURM_DIR/run/slurmctld.pid"; then
        log "slurmctld already running"
    else
        /usr/sbin/slurmctld -f "$CONF" 9>&-
        log "slurmctld started"
    fi
    if pid_alive "$SLURM_DIR/run/slurmd.pid"; then
        log "slurmd already running"
    else
        /usr/sbin/slurmd -f "$CONF" 9>&-
        log "slurmd started"
    fi
}

stop_pidfile() { # name pidfile
    local name=$1 pidfile=$2 pid i
    if ! pid_alive "$pidfile"; then
        rm -f "$pidfile"
        return 0
    fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || { log "$name stopped"; rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) did not stop in 10 s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

# Jobs take MASTER_ADDR from the node list (Lightning does too), so the node name must resolve.
ensure_node_name_resolves() {
    getent hosts "$NODE" >/dev/null && return 0
    log "node name '$NODE' does not resolve; adding '127.0.0.1 $NODE' to /etc/hosts"
    echo "127.0.0.1 $NODE  # added by clbd tests/slurm/cluster.sh" >>/etc/hosts
}

print_logs() {
    local f
    for f in "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmd.log" /var/log/munge/munged.log; do
        [[ -e $f ]] || continue
        echo "----- last lines of $f" >&2
        tail -n 40 "$f" >&2
    done
}

node_state() {
    sinfo --noheader --nodes="$NODE" --format=%T 2>/dev/null | head -n 1
}

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state resumed=0
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
        idle | mixed | allocated | completing | "mixed+"* | "idle+"*)
            log "node $NODE is $state"
            return 0
            ;;
        drain* | drained* | down*)
            if [[ $resumed -eq 0 ]]; then
                log "node $NODE is $state ($(scontrol show node "$NODE" | grep -o 'Reason=.*' || true)); resuming it"
                scontrol update NodeName="$NODE" State=RESUME || true
                resumed=1
            fi
            ;;
        esac
        sleep 0.5
    done
    print_logs
    die "node $NODE not idle after ${TIMEOUT} s (state: '${state:-no answer from slurmctld}')"
}

cmd_start() {
    require_root
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    [[ -z ${missing// /} ]] || die "start: packages missing: ${missing}(run '$0 install' first)"
    local start=$SECONDS
    if write_conf; then
        # A changed config needs restarted daemons: they read it once.
        stop_pidfile slurmd "$SLURM_DIR/run/slurmd.pid"
        stop_pidfile slurmctld "$SLURM_DIR/run/slurmctld.pid"
    fi
    ensure_node_name_resolves
    start_munged
    start_slurm_daemons
    wait_idle
    log "start: cluster up in $((SECONDS - start)) s"
}

cmd_status() {
    local name
    for name in slurmctld slurmd; do
        if pid_alive "$SLURM_DIR/run/$name.pid"; then
            echo "$name: running (pid $(cat "$SLURM_DIR/run/$name.pid"))"
        else
            echo "$name: not running"
        fi
    done
    if munge_works; then echo "munged: running"; else echo "munged: not running"; fi
    if sinfo >/dev/null 2>&1; then
        sinfo --Node --long
        squeue
    else
        echo "sinfo: no answer from slurmctld"
        return 1
    fi
}

cmd_stop() {
    require_root
    stop_pidfile slurmd "$SLURM_DIR/run/slurmd.pid"
    stop_pidfile slurmctld "$SLURM_DIR/run/slurmctld.pid"
    stop_pidfile munged "$MUNGE_SOCKET_DIR/munged.pid"
}

main() {
    [[ $# -gt 0 ]] || { sed -n '2,17p' "$0"; exit 2; }
    # One cluster.sh at a time (pytest-xdist workers may all find the cluster down and start it).
    if [[ $(id -u) -eq 0 ]] && command -v flock >/dev/null; then
        local lock=/run/lock/clbd-slurm-cluster.lock
        [[ -d /run/lock ]] || lock=/tmp/clbd-slurm-cluster.lock
        exec 9>"$lock"
        flock --timeout 1800 9 || die "another cluster.sh held the lock for 30 min"
    fi
    local cmd
    for cmd in "$@"; do
        case $cmd in
        install) cmd_install ;;
        start) cmd_start ;;
        status) cmd_status ;;
        conf) render_conf ;;
        stop) cmd_stop ;;
        restart) cmd_stop; cmd_start ;;
        *) die "unknown command '$cmd' (install, start, status, conf, stop, restart)" ;;
        esac
    done
}

main "$@"
