#!/usr/bin/env bash
# Start the real services the cluster tests talk to, on this machine, as root:
#   - a single-node Slurm: munge, slurmctld and slurmd on localhost, slurm.conf generated for
#     this machine's cores and memory, one default partition `debug`;
#   - PostgreSQL on 127.0.0.1:5432 with role `ablate` (password `ablate`, may create databases)
#     and database `ablate_test`;
#   - headless Chromium and its chromedriver (the HTML report's browser tests; no daemon).
# Idempotent: a running daemon is left alone. Packages come from Debian (apt) when missing.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v pg_ctlcluster >/dev/null || need+=(postgresql)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if ((${#need[@]})); then
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# ---- munge (Slurm's authentication)
install -d -o munge -g munge -m 700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  su -s /bin/sh munge -c "munged --force" 2>/dev/null || munged --force
fi

# ---- Slurm
host=$(hostname -s)
mem_mib=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
install -d /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=ablate
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
SlurmdTimeout=30
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
NodeName=${host} CPUs=$(nproc) RealMemory=$((mem_mib - 1024)) State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
  state=$(sinfo -h -o %T 2>/dev/null | head -1 || true)
  case "$state" in idle|mixed|allocated) break ;; esac
  if [ "$state" = "down" ] || [ "$state" = "drained" ] || [ "$state" = "down*" ]; then
    scontrol update nodename="$host" state=resume 2>/dev/null || true
  fi
  sleep 1
done
echo "slurm: node $host $(sinfo -h -o %T | head -1), $(nproc) CPUs, $((mem_mib - 1024)) MiB"

# ---- PostgreSQL on loopback
ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1" "$2}' | grep -qx "$ver main"; then
  pg_createcluster "$ver" main
fi
pg_ctlcluster "$ver" main start 2>/dev/null || true
for _ in $(seq 30); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 1
done
psql_() { su postgres -c "psql -v ON_ERROR_STOP=1 -qtAc \"$1\""; }
[ "$(psql_ "SELECT 1 FROM pg_roles WHERE rolname='ablate'")" = 1 ] \
  || psql_ "CREATE ROLE ablate LOGIN PASSWORD 'ablate' CREATEDB"
# the no-password-on-disk tests make a role of their own with a unique password
psql_ "ALTER ROLE ablate CREATEDB CREATEROLE"
[ "$(psql_ "SELECT 1 FROM pg_database WHERE datname='ablate_test'")" = 1 ] \
  || psql_ "CREATE DATABASE ablate_test OWNER ablate"
echo "postgresql $ver: postgresql+psycopg://ablate:***@127.0.0.1:5432/ablate_test"
