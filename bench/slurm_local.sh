#!/usr/bin/env bash
# A one-node SLURM on this machine, for trying `--cluster slurm` and the sbatch templates of
# docs/slurm/ without a cluster (tests/test_slurm.py's slow test starts it the same way).
#
#   bench/slurm_local.sh start    # munged, slurmctld and slurmd; prints the SLURM_CONF to export
#   bench/slurm_local.sh status   # sinfo and `srun hostname`
#   bench/slurm_local.sh stop     # stops the daemons this script started
#   bench/slurm_local.sh env      # prints: export SLURM_CONF=...
#   bench/slurm_local.sh running  # exit status 0 when slurmctld and slurmd of $WSI_SLURM_DIR run
#
# Needs root (SlurmUser=root; the daemons are started directly: no systemd) and Debian's
# packages: apt-get install -y slurm-wlm munge. Everything it writes is under $WSI_SLURM_DIR
# (default /tmp/wsi-slurm): slurm.conf, state, spool, logs and pid files; /etc/slurm is left
# alone, so commands need SLURM_CONF pointing there. Idempotent: start when running only
# checks, stop when stopped does nothing. No cgroups (proctrack/linuxproc, task/none), so
# job limits are not enforced: fine for a test, not for sharing a machine.
set -euo pipefail

DIR=${WSI_SLURM_DIR:-/tmp/wsi-slurm}
CONF=$DIR/slurm.conf
MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_PID=/run/munge/munged.pid  # munged runs as munge: its pid file goes where munge may write
export SLURM_CONF=$CONF

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

alive() {  # alive PIDFILE: the process named in PIDFILE runs
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc --all)
    mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF.tmp" <<EOF
# written by bench/slurm_local.sh: one node, this machine
ClusterName=wsilocal
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=60
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

start_munge() {
    if munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
        return  # a munged answers already (ours or the system's)
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
    for _ in $(seq 50); do
        if munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            cp "$MUNGE_PID" "$DIR/munged.pid"  # ours: stop stops it
            return
        fi
        sleep 0.1
    done
    die "munged did not start (see /var/log/munge/munged.log)"
}

wait_node() {  # until the node is idle (or mixed/allocated) and srun works
    local state
    for _ in $(seq 100); do
        state=$(sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
        case $state in
            idle*|mixed*|allocated*) return 0 ;;
        esac
        sleep 0.3
    done
    die "the node did not come up (state '${state:-none}'; see $DIR/log/)"
}

start() {
    [[ $EUID -eq 0 ]] || die "needs root (SlurmUser=root and the daemons' state under $DIR)"
    command -v slurmctld >/dev/null || die "slurmctld is not installed: apt-get install -y slurm-wlm munge"
    mkdir -p "$DIR"
    if ! alive "$DIR/slurmctld.pid" || ! alive "$DIR/slurmd.pid"; then
        write_conf
    fi
    start_munge
    alive "$DIR/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF" -c   # -c: no state from an earlier start
    alive "$DIR/slurmd.pid" || /usr/sbin/slurmd -f "$CONF"
    wait_node
    scontrol update nodename="$(hostname -s)" state=resume >/dev/null 2>&1 || true
    echo "export SLURM_CONF=$CONF"
}

stop() {
    local f pid
    scancel --user root >/dev/null 2>&1 || true
    for f in slurmd slurmctld munged; do
        [[ -s $DIR/$f.pid ]] || continue
        pid=$(cat "$DIR/$f.pid")
        if kill -0 "$pid" 2>/dev/null; then
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
        rm -f "$DIR/$f.pid"
    done
}

status() {
    sinfo
    srun -N1 -n1 -t 1 hostname
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    running) alive "$DIR/slurmctld.pid" && alive "$DIR/slurmd.pid" ;;
    *) echo "usage: $0 start|status|stop|env|running" >&2; exit 2 ;;
esac
