#!/usr/bin/env bash
# A real two-node Slurm on this one machine, for testing slurm.sh and tools/submit.py (CI runs it).
#
#   bash tools/slurm_local.sh start    install slurm-wlm + munge with apt if missing, start munged,
#                                      slurmctld and two slurmd ("nodes" n1, n2), wait until idle
#   bash tools/slurm_local.sh stop     stop the daemons this script started
#   bash tools/slurm_local.sh status   sinfo
#
# Needs root (apt, munge's own user, /etc/hosts). State lives in $SLURM_LOCAL_DIR
# (default /tmp/mamba-slurm-local); the slurm.conf written there is also linked to /etc/slurm so
# that sbatch/srun/scontrol find it without SLURM_CONF. Settings and why: /work/shared/SLURM-LOCAL.md
# (measured on Debian 12, Slurm 22.05):
#   - proctrack/linuxproc + task/none: no cgroups needed (containers rarely delegate them);
#   - MULTIPLE_SLURMD (Debian's build has it): two slurmd on one host, told apart by port;
#   - AuthInfo=cred_expire=10: a requeued job restarts ~20 s after the requeue instead of ~2 min;
#   - JobFileAppend=1: a requeued job's output file is appended to, not wiped.
set -euo pipefail
mode=${1:-start}
dir=${SLURM_LOCAL_DIR:-/tmp/mamba-slurm-local}
conf=$dir/slurm.conf
cpus=$(nproc)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

install_if_missing() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm/munge are not installed and installing them needs root"
  command -v apt-get >/dev/null || die "slurm-wlm/munge are not installed and there is no apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update >/dev/null && apt-get install -y --no-install-recommends slurm-wlm munge >/dev/null; }
}

write_conf() {
  mkdir -p "$dir"/{state,spool/n1,spool/n2,log,run}
  cat >"$conf.tmp" <<EOF
ClusterName=mambalocal
SlurmctldHost=localhost
SlurmctldPort=16817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
JobFileAppend=1
KillWait=30
MinJobAge=600
SchedulerType=sched/backfill
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  mv "$conf.tmp" "$conf"
  mkdir -p /etc/slurm
  ln -sf "$conf" /etc/slurm/slurm.conf
  # slurm.sh's rendezvous address is the first node's name: it must resolve.
  grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts || echo "127.0.0.1 n1 n2" >>/etc/hosts
}

start_munge() {
  munge -n >/dev/null 2>&1 </dev/null && return  # already running
  [ -f /etc/munge/munge.key ] || runuser -u munge -- mungekey --create >/dev/null 2>&1 || mungekey --create
  mkdir -p /run/munge && chown munge:munge /run/munge
  # As root munged refuses ("PRNG seed dir is insecure"): run it as its own user.
  runuser -u munge -- munged
}

start() {
  install_if_missing
  write_conf
  start_munge
  if ! scontrol ping 2>/dev/null | grep -q UP; then
    slurmctld
  fi
  for n in n1 n2; do
    pidfile=$dir/run/slurmd.$n.pid
    if ! { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
      slurmd -N "$n"
    fi
  done
  for _ in $(seq 60); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')" = "idle " ]; then
      sinfo
      return
    fi
    # A node left "down"/"drain" by a previous run comes back with an explicit resume.
    scontrol update nodename=n[1-2] state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  sinfo || true
  die "nodes did not become idle within 60 s; see $dir/log/"
}

stop() {
  for f in "$dir"/run/slurmd.*.pid "$dir"/run/slurmctld.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
}

case $mode in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) die "usage: slurm_local.sh start|stop|status" ;;
esac
