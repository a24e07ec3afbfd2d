#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for the tests marked `slurm`:
#   tools/slurm_local.sh start    install (Debian's slurm-wlm, munge, slurmdbd + MariaDB) if missing,
#                                 configure NODES compute nodes, start the daemons, wait until idle
#   tools/slurm_local.sh status   daemons and sinfo
#   tools/slurm_local.sh stop     stop only the daemons this script started
#
# Every node is a slurmd of its own (NodeAddr 127.0.0.1, one port each) and offers 2 CPUs,
# whatever the machine has: jobs oversubscribe the cores, which is what a CPU test wants.
# slurmdbd + MariaDB give real job states to sacct (submitit reads them; without accounting
# every finished job looks UNKNOWN). Needs root; no systemd: daemons are started directly and
# their pid files kept in STATE.
set -euo pipefail

STATE=${HPCLLM_SLURM_STATE:-/var/tmp/hpcllm-slurm}
NODES=${HPCLLM_SLURM_NODES:-2}
CPUS=${HPCLLM_SLURM_CPUS:-2}
MEM_MB=${HPCLLM_SLURM_MEM_MB:-24576}  # per node; hw=cpu asks for 90% of its 24 GB
CLUSTER=hpcllm
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by hpcllm tools/slurm_local.sh"
DB_PASS=hpcllm-local

log() { echo "slurm_local: $*" >&2; }

alive() {  # alive NAME: the daemon whose pid file STATE/NAME.pid names is running
    local pid
    pid=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq "$((limit * 4))"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    log "gave up waiting for $what; logs in $STATE/log"
    return 1
}

install() {
    local missing=()
    command -v slurmctld >/dev/null || missing+=(slurm-wlm)
    command -v slurmdbd >/dev/null || missing+=(slurmdbd)
    command -v munged >/dev/null || missing+=(munge)
    command -v mariadbd >/dev/null || missing+=(mariadb-server)
    [ ${#missing[@]} -eq 0 ] && return
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

node_names() { seq -f "node%g" 1 "$NODES"; }

configure() {
    mkdir -p "$STATE"/{log,ctld,spool} /etc/slurm
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script: leaving it alone"
        exit 1
    fi
    # Slurm's node names must resolve (MASTER_ADDR is the first of them); all are this machine.
    local names
    names=$(node_names | tr '\n' ' ')
    if ! grep -q "hpcllm-slurm-nodes" /etc/hosts; then
        echo "127.0.0.1 ${names}# hpcllm-slurm-nodes" >> /etc/hosts
    fi
    {
        echo "$MARK"
        cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Trust the CPUs/RealMemory below rather than the hardware (they oversubscribe it on purpose).
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
# Quick turnaround for short test jobs: schedule often, kill soon after the signal grace.
SchedulerParameters=sched_interval=2,bf_interval=5
KillWait=20
MinJobAge=600
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=16819
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
EOF
        local port=16900
        for name in $(node_names); do
            port=$((port + 1))
            echo "NodeName=$name NodeAddr=127.0.0.1 Port=$port CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    cat > "$DBD_CONF" <<EOF
$MARK
AuthType=auth/munge
DbdHost=$(hostname)
DbdAddr=127.0.0.1
DbdPort=16819
SlurmUser=root
PidFile=$STATE/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DB_PASS
EOF
    chmod 600 "$DBD_CONF"
}

start_munge() {
    alive munged && return
    [ -s /etc/munge/munge.key ] || mungekey -c
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- munged --pid-file=/run/munge/munged.pid
    wait_for 10 munged test -s /run/munge/munged.pid
    cp /run/munge/munged.pid "$STATE/munged.pid"
}

start_mariadb() {
    alive mariadbd && return
    mkdir -p /run/mysqld
    chown mysql:mysql /run/mysqld
    if [ ! -d /var/lib/mysql/mysql ]; then
        mariadb-install-db --user=mysql --datadir=/var/lib/mysql >"$STATE/log/mariadb-install.log" 2>&1
    fi
    runuser -u mysql -- mariadbd --datadir=/var/lib/mysql --socket=/run/mysqld/mysqld.sock \
        --pid-file=/run/mysqld/mariadbd.pid --bind-address=127.0.0.1 --skip-name-resolve \
        >>"$STATE/log/mariadbd.log" 2>&1 &
    wait_for 60 MariaDB mariadb -e "select 1"
    cp /run/mysqld/mariadbd.pid "$STATE/mariadbd.pid"  # the daemon (user mysql) cannot write into STATE
    mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurm() {
    if ! alive slurmdbd; then
        slurmdbd
        wait_for 60 slurmdbd sacctmgr -n show cluster
    fi
    sacctmgr -n show cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
    alive slurmctld || slurmctld
    for name in $(node_names); do
        alive "slurmd-$name" || slurmd -N "$name"
    done
    wait_for 60 "$NODES idle nodes" idle_nodes
}

idle_nodes() {
    [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -ge "$NODES" ]
}

start() {
    install
    configure
    start_munge
    start_mariadb
    start_slurm
    sinfo
}

stop() {
    local name
    for name in $(node_names | sed 's/^/slurmd-/') slurmctld slurmdbd mariadbd munged; do
        if alive "$name"; then
            kill "$(cat "$STATE/$name.pid")"
            for _ in $(seq 80); do alive "$name" || break; sleep 0.25; done
            log "stopped $name"
        fi
        rm -f "$STATE/$name.pid"
    done
}

status() {
    local name code=0
    for name in munged mariadbd slurmdbd slurmctld $(node_names | sed 's/^/slurmd-/'); do
        if alive "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; code=1; fi
    done
    [ $code -eq 0 ] && sinfo
    return $code
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
