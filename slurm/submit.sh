#!/bin/bash
# Submit train.sbatch / convert.sbatch with the node, GPU and task counts taken from the
# environment (an #SBATCH line cannot read variables). Prints sbatch's answer.
#
#   slurm/submit.sh train [sbatch options] [--] SCRIPT [script args...]
#   slurm/submit.sh convert [sbatch options] -- --hf-dir D --out O --tp 4 --pp 2
#
# Everything before `--` goes to sbatch (e.g. --parsable, -t 4:00:00, --dependency=afterok:123);
# without `--`, the leading arguments that start with `-` do (use the --opt=value form then).
#
# Environment (defaults in brackets):
#   NODES [1]            nodes (train; convert: from TP x PP and GPUS_PER_NODE)
#   GPUS_PER_NODE [8]    GPUs per node, requested as --gpus-per-node (not in CPU mode)
#   TASKS_PER_NODE       [GPUS_PER_NODE; CPU mode: 1, convert: all tasks] tasks (= ranks) per node
#   MEGATRON_LATENT_CPU  1: CPU mode, no GPU request, gloo
#   PARTITION, ACCOUNT, QOS, TIME_LIMIT, JOB_NAME    the usual sbatch options when set
#   LOG_DIR [slurm/logs] directory of the job logs (<job name>-<job id>.out), created if missing
#   TP, PP, CKPT_DIR, CONTAINER_IMAGE, ...: read by the job itself (slurm/common.sh)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/common.sh
source "$HERE/common.sh"

KIND=${1:-}
case "$KIND" in
  train|convert) shift ;;
  *) ml_die "usage: slurm/submit.sh train|convert [sbatch options] [--] args..." ;;
esac

SBATCH_OPTS=()
if printf '%s\n' "$@" | grep -qx -- '--'; then
  while [ "$1" != "--" ]; do SBATCH_OPTS+=("$1"); shift; done
  shift
else
  while [ $# -gt 0 ] && [ "${1#-}" != "$1" ]; do SBATCH_OPTS+=("$1"); shift; done
fi
ARGS=("$@")

CPU=${MEGATRON_LATENT_CPU:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$CPU" = 1 ]; then
  [ "$KIND" = convert ] || TASKS_PER_NODE=${TASKS_PER_NODE:-1}  # convert: all on one node
else
  TASKS_PER_NODE=${TASKS_PER_NODE:-$GPUS_PER_NODE}
fi
NODES=${NODES:-1}
for v in NODES GPUS_PER_NODE; do
  ml_is_posint "${!v}" || ml_die "$v must be a positive integer (got '${!v}')"
done
[ -z "${TASKS_PER_NODE:-}" ] || ml_is_posint "$TASKS_PER_NODE" || ml_die "TASKS_PER_NODE must be a positive integer"

if [ "$KIND" = train ]; then
  [ -n "${SCRIPT:-}" ] || [ ${#ARGS[@]} -gt 0 ] || ml_die "train: give the training SCRIPT"
  # Fail here, before queueing, on a layout the job would refuse anyway.
  tp=$(ml_arg_value --tensor-model-parallel-size "${ARGS[@]}"); tp=${tp:-${TP:-1}}
  pp=$(ml_arg_value --pipeline-model-parallel-size "${ARGS[@]}"); pp=${pp:-${PP:-1}}
  cp=$(ml_arg_value --context-parallel-size "${ARGS[@]}"); cp=${cp:-1}
  ml_check_parallel $((NODES * TASKS_PER_NODE)) "$tp" "$pp" "$cp" "$NODES" "$TASKS_PER_NODE"
else
  tp=$(ml_arg_value --tp "${ARGS[@]}"); pp=$(ml_arg_value --pp "${ARGS[@]}")
  nt=1
  if ml_has_arg --hf-dir "${ARGS[@]}"; then nt=$(( ${tp:-1} * ${pp:-1} )); fi
  tpn=${TASKS_PER_NODE:-$nt}
  TASKS_PER_NODE=$(( nt < tpn ? nt : tpn ))
  NODES=$(( (nt + TASKS_PER_NODE - 1) / TASKS_PER_NODE ))
  GPUS_PER_NODE=$TASKS_PER_NODE
fi

LOG_DIR=${LOG_DIR:-$(dirname "$HERE")/slurm/logs}
mkdir -p "$LOG_DIR"
OPTS=(--nodes="$NODES" --ntasks-per-node="$TASKS_PER_NODE" --output="$LOG_DIR/%x-%j.out")
[ "$CPU" = 1 ] || OPTS+=(--gpus-per-node="$GPUS_PER_NODE")
[ -z "${PARTITION:-}" ] || OPTS+=(--partition="$PARTITION")
[ -z "${ACCOUNT:-}" ] || OPTS+=(--account="$ACCOUNT")
[ -z "${QOS:-}" ] || OPTS+=(--qos="$QOS")
[ -z "${TIME_LIMIT:-}" ] || OPTS+=(--time="$TIME_LIMIT")
[ -z "${JOB_NAME:-}" ] || OPTS+=(--job-name="$JOB_NAME")

CMD=(sbatch "${OPTS[@]}" "${SBATCH_OPTS[@]}" "$HERE/$KIND.sbatch" "${ARGS[@]}")
if [ "${DRY_RUN:-0}" = 1 ]; then echo "${CMD[*]}"; exit 0; fi
exec "${CMD[@]}"
