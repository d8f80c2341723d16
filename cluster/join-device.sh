#!/usr/bin/env bash
# Join this machine (a Raspberry Pi, a Jetson, a laptop) to a flexray Ray cluster as a worker
# that advertises its device class, so fleet groups can pin devices to it:
#
#   resources: {"device:CLASS": 1}          # by custom resource (every Ray version)
#   node_labels: {flexray.io/device: CLASS} # or by node label (Ray's label selector)
#
# Usage:  cluster/join-device.sh HEAD_HOST:6379 CLASS [--num-cpus N] [--probe] [--dry-run] [-- RAY_START_ARGS...]
#
#   CLASS      device class, e.g. rpi4 (a catalog name from `flexray devices` or your own profile name)
#   --num-cpus CPUs Ray may use here (default: all cores); one device actor uses fleet.num_cpus_per_actor
#   --probe    first calibrate this board's latency model and print a fleet.profiles line to paste
#   --dry-run  print the ray start command instead of running it
#   -- ...     passed on to `ray start` (e.g. --block, --temp-dir=/tmp/ray, --node-ip-address=IP)
#
# Token authentication: the cluster runs with RAY_AUTH_MODE=token. Give this board the token
# through RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token (copy it from the
# head with scp; `ray get-auth-token` on the head prints it). Keep the file mode 600.
# Install first:  python3 -m pip install flexray   (or pip install -e . in a checkout)
set -euo pipefail

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }

[[ $# -ge 1 && ( $1 == -h || $1 == --help ) ]] && usage 0
[[ $# -ge 2 ]] || usage 2
head_address=$1 device=$2
shift 2
num_cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc)
probe=0 dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --num-cpus) num_cpus=${2:?--num-cpus needs a number}; shift 2 ;;
    --num-cpus=*) num_cpus=${1#*=}; shift ;;
    --probe) probe=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    *) echo "join-device: unknown option $1 (ray start options go after --)" >&2; exit 2 ;;
  esac
done

if [[ ! $device =~ ^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$ ]]; then
  echo "join-device: device class '$device' must be letters, digits, '_', '-' or '.' (it becomes a Ray label value)" >&2
  exit 2
fi
if [[ ! $num_cpus =~ ^[0-9]+$ ]]; then
  echo "join-device: --num-cpus must be a whole number (got '$num_cpus')" >&2
  exit 2
fi

export RAY_AUTH_MODE=token
if [[ -z ${RAY_AUTH_TOKEN:-} && ! -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
  echo "join-device: no Ray auth token: set RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token to ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} (mode 600)" >&2
  exit 2
fi

if [[ $probe == 1 ]]; then
  echo "join-device: measuring training throughput (about 10 s)..." >&2
  flexray probe --name "$device" --threads "$num_cpus"
fi

cmd=(ray start --address "$head_address" --num-cpus "$num_cpus"
     --resources "{\"device:$device\": 1}" --labels "flexray.io/device=$device" --disable-usage-stats
     ${extra[@]+"${extra[@]}"})
if [[ $dry_run == 1 ]]; then  # shell-quoted, ready to copy
  out=()
  for arg in "${cmd[@]}"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=,@+-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
  exit 0
fi
exec "${cmd[@]}"
