#!/usr/bin/env bash
# start-slurm.sh - idempotent one-host Slurm 22.05 test cluster with accounting, for sftjobs' tests
# Deliberately WITHOUT DependencyParameters=kill_invalid_depend: many real clusters lack it, and
# sftjobs must notice a broken afterok chain (DependencyNeverSatisfied) by itself.
# Preemption as shared clusters set it up: a job in a partition of a higher PriorityTier preempts jobs of
# debug/short (tier 1), which Slurm requeues (PreemptMode=REQUEUE) after SIGTERM and a 30 s GraceTime. The
# preemption test creates that partition for its own length (scontrol create); jobs of one tier never preempt
# each other, so no other test sees preemption.
# (Debian 12, run as root, no systemd: daemons are started directly).
# N slurmd instances (n1..nN) on this host, each advertising CPUS cpus and
# GPUS fake GPUs. Safe to run again: installs only what is missing, rewrites
# configs only if they changed (then restarts slurmctld/slurmd), starts only
# daemons that are not running, waits until every node is idle.
set -euo pipefail

NODES=${SLURM_TEST_NODES:-2}        # slurmd instances on this host
CPUS=${SLURM_TEST_CPUS:-8}          # CPUs per node (may exceed real cores)
MEM_MB=${SLURM_TEST_MEM_MB:-8000}   # RealMemory per node, MB
GPUS=${SLURM_TEST_GPUS:-8}          # fake GPUs per node, 0 = none
CLUSTER=${SLURM_TEST_CLUSTER:-local}
PARTITION=${SLURM_TEST_PARTITION:-debug}
DBPASS=${SLURM_TEST_DBPASS:-slurmpw}
HOST=$(hostname -s)
T0=$(date +%s%N)
log() { local d=$((($(date +%s%N) - T0) / 100000000)); echo "[start-slurm +$((d / 10)).$((d % 10))s] $*"; }
wait_for() { # wait_for SECONDS DESCRIPTION CMD...
  local t=$1 what=$2; shift 2
  for _ in $(seq $((t * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  echo "timed out waiting for $what" >&2; return 1
}
live() { # live PID : exists and is not a zombie
  [ -r "/proc/$1/stat" ] && [ "$(cut -d' ' -f3 "/proc/$1/stat" 2>/dev/null)" != Z ]
}
alive() { # alive PIDFILE COMM : process from pidfile is running and has that name
  local p; [ -s "$1" ] || return 1; p=$(cat "$1")
  live "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ]
}
stop() { # stop PIDFILE COMM
  local p; alive "$1" "$2" || return 0; p=$(cat "$1"); kill "$p"
  for _ in $(seq 150); do live "$p" || break; sleep 0.1; done; rm -f "$1"
}

# ---------------------------------------------------------------- packages
PKGS=(munge mariadb-server slurmctld slurmd slurmdbd slurm-client)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ ! -e /usr/sbin/policy-rc.d ]; then   # keep postinst scripts from starting daemons
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d; trap - EXIT
  log "packages installed"
fi

# ---------------------------------------------------------------- munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then runuser -u munge -- mungekey -c; fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! alive /run/munge/munged.pid munged; then
  runuser -u munge -- /usr/sbin/munged --force
fi
wait_for 10 munged sh -c 'munge -n | unmunge'
log "munged up"

# ---------------------------------------------------------------- mariadb
install -d -o mysql -g mysql /run/mysqld /var/log/mysql
[ -d /var/lib/mysql/mysql ] || mariadb-install-db --user=mysql --datadir=/var/lib/mysql >/dev/null
if ! mysqladmin ping >/dev/null 2>&1; then
  setsid -f /usr/sbin/mariadbd --user=mysql --skip-log-error \
    </dev/null >>/var/log/mysql/mariadbd.out 2>&1
fi
wait_for 60 mariadb mysqladmin ping
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DBPASS}';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
log "mariadb up"

# ---------------------------------------------------------------- configs
install -d /etc/slurm
install -d -o slurm -g slurm /var/spool/slurmctld /var/log/slurm /run/slurm
changed=""
put() { # put FILE MODE OWNER <content on stdin>; records FILE in $changed if it differs
  local tmp; tmp=$(mktemp); cat >"$tmp"
  if ! cmp -s "$tmp" "$1"; then install -m "$2" -o "$3" -g "$3" "$tmp" "$1"; changed+=" $1"; fi
  rm -f "$tmp"
}
if [ "$NODES" -eq 1 ]; then NODELIST=n1; PORTS=17001
else NODELIST="n[1-$NODES]"; PORTS="[17001-$((17000 + NODES))]"; fi

# slurmd 22.05 always initialises its cgroup plugin, even with proctrack/linuxproc:
# with nothing on /sys/fs/cgroup it dies ("Unable to initialize cgroup plugin").
# Mount the cgroup v1 layout this VM has if nothing is there.
if ! mountpoint -q /sys/fs/cgroup; then
  mount -t tmpfs -o mode=755 cgroup_root /sys/fs/cgroup
  for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
    grep -q "^$c[[:space:]]" /proc/cgroups || continue
    mkdir -p /sys/fs/cgroup/$c
    mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c 2>/dev/null || rmdir /sys/fs/cgroup/$c
  done
  mkdir -p /sys/fs/cgroup/systemd
  mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
fi
if [ -f /sys/fs/cgroup/memory/memory.limit_in_bytes ] && [ -d /sys/fs/cgroup/freezer ]; then
  # cgroup v1 (this VM): enforce memory (OUT_OF_MEMORY) and cores
  PLUGINS="ProctrackType=proctrack/cgroup
TaskPlugin=task/cgroup
JobAcctGatherType=jobacct_gather/cgroup"
  put /etc/slurm/cgroup.conf 0644 root <<EOF
CgroupPlugin=cgroup/v1
ConstrainCores=yes
ConstrainRAMSpace=yes
ConstrainSwapSpace=no
ConstrainDevices=no
EOF
else
  # no usable v1 controllers; cgroup2-only hosts are untested (IgnoreSystemd: no systemd here)
  PLUGINS="ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux"
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    put /etc/slurm/cgroup.conf 0644 root <<EOF
CgroupPlugin=cgroup/v2
IgnoreSystemd=yes
EOF
  fi
fi

GRESLINE="" NODEGRES=""
if [ "$GPUS" -gt 0 ]; then
  # gres/gpu ignores File-less GPUs and rejects plain files: use char devices.
  # Major 195 (nvidia) without a driver: open() gives ENXIO, harmless.
  install -d /var/lib/fakegpu
  for i in $(seq 0 $((GPUS - 1))); do
    [ -c /var/lib/fakegpu/nvidia$i ] || mknod -m 666 /var/lib/fakegpu/nvidia$i c 195 $i
  done
  GRESLINE="GresTypes=gpu
AccountingStorageTRES=gres/gpu"
  NODEGRES=" Gres=gpu:$GPUS"
  put /etc/slurm/gres.conf 0644 root <<EOF
AutoDetect=off
NodeName=$NODELIST Name=gpu File=/var/lib/fakegpu/nvidia[0-$((GPUS - 1))]
EOF
else
  put /etc/slurm/gres.conf 0644 root </dev/null
fi

put /etc/slurm/slurm.conf 0644 root <<EOF
# generated by start-slurm.sh
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
AuthInfo=cred_expire=10
SlurmUser=slurm
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
KillWait=10
$PLUGINS
JobAcctGatherFrequency=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageEnforce=associations,limits,qos
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$((MEM_MB / CPUS))
$GRESLINE
NodeName=$NODELIST NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$PORTS CPUs=$CPUS RealMemory=$MEM_MB$NODEGRES State=UNKNOWN
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=$PARTITION Nodes=$NODELIST Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30
PartitionName=short Nodes=$NODELIST Default=NO MaxTime=00:10:00 State=UP PriorityTier=1 GraceTime=30
EOF

put /etc/slurm/slurmdbd.conf 0600 slurm <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DBPASS
StorageLoc=slurm_acct_db
EOF

if [ -n "$changed" ]; then   # restart daemons whose config changed
  log "changed:$changed"
  case "$changed" in *slurmdbd.conf*) stop /run/slurm/slurmdbd.pid slurmdbd ;; esac
  if [ -n "${changed/ \/etc\/slurm\/slurmdbd.conf/}" ]; then
    stop /run/slurm/slurmctld.pid slurmctld
    for pf in /run/slurm/slurmd.pid /run/slurm/slurmd-*.pid; do stop "$pf" slurmd; done
  fi
fi

# ---------------------------------------------------------------- slurmdbd
alive /run/slurm/slurmdbd.pid slurmdbd || /usr/sbin/slurmdbd
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER" ||
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
# Enforced associations (as on most real clusters): root submits the tests under account sftjobs_test,
# so an unknown account or QOS is refused by sbatch.
sacctmgr -n -P list account format=account | grep -qx sftjobs_test ||
  sacctmgr -i add account sftjobs_test cluster="$CLUSTER" >/dev/null
sacctmgr -n -P list user root format=user,defaultaccount | grep -q '^root|sftjobs_test$' ||
  sacctmgr -i add user root account=sftjobs_test defaultaccount=sftjobs_test cluster="$CLUSTER" >/dev/null
log "slurmdbd up"

# ---------------------------------------------------------------- slurmctld, slurmd
alive /run/slurm/slurmctld.pid slurmctld || /usr/sbin/slurmctld
wait_for 30 slurmctld scontrol ping
for i in $(seq 1 "$NODES"); do
  install -d /var/spool/slurmd/n$i
  alive /run/slurm/slurmd-n$i.pid slurmd || /usr/sbin/slurmd -N n$i
done
log "slurmctld + $NODES slurmd started"

all_idle() { ! sinfo -h -N -o '%t' | grep -qvE '^(idle|mix|alloc|comp)$'; }
if ! wait_for 20 "nodes idle" all_idle; then   # e.g. drained under an older config
  for n in $(sinfo -h -N -o '%N %t' | awk '$2 ~ /drain|down|fail/ {print $1}'); do
    scontrol update nodename="$n" state=resume || true
  done
  wait_for 40 "nodes idle" all_idle
fi
sinfo -N -o '%N %P %t %c %m %G'
log "cluster ready"
