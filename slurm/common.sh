# shellcheck shell=bash
# Shared by slurm/train.sbatch, slurm/convert.sbatch and slurm/submit.sh (sourced, not executed).
#
# Launch model: ONE TASK PER GPU, started by `srun` (not one torchrun per node):
#   - slurm itself starts, signals and kills every rank: scancel, the pre-timeout signal,
#     preemption and requeue reach the Python processes directly, without a torchrun agent in
#     between that has its own restart and signal policy;
#   - every rank has its rank from slurm (SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS), which
#     megatron_latent.parallel.initialize maps to RANK / LOCAL_RANK / WORLD_SIZE: no per-node
#     rank arithmetic, no rendezvous backend, one process tree fewer;
#   - pyxis containers and `--kill-on-bad-exit` work per task: one crashing rank ends the step
#     at once instead of leaving the others blocked in a collective until the time limit;
#   - the same command runs on CPU (gloo) and GPU (NCCL) and on 1 or N nodes.
# Every task sees all GPUs of its node and picks `cuda:LOCAL_RANK` (parallel.py), so do not
# bind GPUs per task (`--gpus-per-task`, `--gpu-bind=single:1`).
#
# Environment variables read here (defaults in brackets):
#   TP [1], PP [1]            tensor / pipeline parallel sizes (unless given as script flags)
#   CKPT_DIR                  when set: `--save CKPT_DIR --load CKPT_DIR` (resume + requeue)
#   MEGATRON_LATENT_CPU [0]   1: CPU + gloo even on a GPU node (also chosen when no GPU is seen)
#   PYTHON                    interpreter [container: python; else REPO/.venv/bin/python, python3]
#   ML_MASTER_ADDR            overrides MASTER_ADDR [first host of the job]
#   ML_MASTER_PORT            overrides MASTER_PORT [20000 + job id % 12000]
#   CONTAINER_IMAGE           pyxis image (squashfs file or registry#image:tag); unset: no container
#   CONTAINER_MOUNTS          extra pyxis mounts SRC:DST[,SRC:DST..] (repo, CKPT_DIR, DATA_DIR and
#                             the submit dir are mounted at their own paths automatically)
#   DATA_DIR                  mounted into the container when set (the scripts take their own flags)
#   WANDB_MODE [offline]      wandb stays offline unless set (online / disabled)
#   SRUN_EXTRA_ARGS           appended to srun, e.g. "--label" to prefix output lines with the rank
#   MAX_REQUEUES [10]         the pre-timeout signal requeues at most this many times
#   SAVE_SIGNAL, SAVE_GRACE   on the pre-timeout warning send this signal to the ranks [USR1 if
#                             CKPT_DIR is set; none: off], wait up to SAVE_GRACE [240] s, requeue
#   DRY_RUN [0]               1: print the srun command instead of running it
#   REPO_DIR                  the checkout [the parent of the slurm/ dir holding this file]

ML_TAG="[megatron_latent/slurm]"

ml_log() { echo "$ML_TAG $*"; }
ml_die() { echo "$ML_TAG error: $*" >&2; exit 1; }

# Value of flag NAME in the remaining arguments ("--name V" or "--name=V"); empty if absent.
ml_arg_value() {
  local name=$1; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      "$name") echo "${2:-}"; return ;;
      "$name"=*) echo "${1#*=}"; return ;;
    esac
    shift
  done
}

ml_has_arg() {
  local name=$1; shift
  local a
  for a in "$@"; do
    case "$a" in "$name"|"$name"=*) return 0 ;; esac
  done
  return 1
}

ml_is_posint() { case "$1" in ''|*[!0-9]*|0) return 1 ;; *) return 0 ;; esac; }

# The checkout: the parent of the directory holding this file (the sbatch scripts source it
# from the submitted script's real path, see there), unless REPO_DIR is set.
ML_SLURM_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ml_find_repo() {
  if [ -n "${REPO_DIR:-}" ]; then echo "$REPO_DIR"; else dirname "$ML_SLURM_DIR"; fi
}

# A clear message (before any process starts) when TP x PP x CP does not divide the world size.
ml_check_parallel() {
  local world=$1 tp=$2 pp=$3 cp=${4:-1} nodes=${5:-?} tpn=${6:-?}
  local v
  for v in "$tp" "$pp" "$cp"; do
    ml_is_posint "$v" || ml_die "parallel sizes must be positive integers (TP=$tp PP=$pp CP=$cp)"
  done
  local mp=$((tp * pp * cp))
  if [ $((world % mp)) -ne 0 ]; then
    ml_die "tensor ($tp) x pipeline ($pp) x context ($cp) parallel size = $mp does not divide" \
      "the world size $world ($nodes nodes x $tpn tasks per node); choose TP/PP so that" \
      "TP*PP*CP divides nodes x tasks per node (data parallel size = world / (TP*PP*CP))"
  fi
}

# Tasks per node of the allocation ("4" or "4(x2)" in SLURM_NTASKS_PER_NODE / SLURM_TASKS_PER_NODE).
ml_tasks_per_node() {
  local t=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}
  t=${t%%(*}; t=${t%%,*}
  if ml_is_posint "$t"; then echo "$t"; else echo $(( ${SLURM_NTASKS:-1} / ${SLURM_JOB_NUM_NODES:-1} )); fi
}

ml_gpus_on_node() {
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
    return
  fi
  echo 0
}

# Job-wide environment for the tasks (exported; srun passes it on).
ml_setup_env() {
  REPO_DIR=$(ml_find_repo)
  export REPO_DIR
  export PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}"
  # A RANK inherited from the submitting shell would make parallel.py ignore SLURM_PROCID.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE GROUP_RANK NODE_RANK

  NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
  TASKS_PER_NODE=$(ml_tasks_per_node)
  WORLD=${SLURM_NTASKS:-$((NNODES * TASKS_PER_NODE))}

  local gpus
  gpus=$(ml_gpus_on_node)
  if [ "${MEGATRON_LATENT_CPU:-0}" = 1 ] || [ "${gpus:-0}" = 0 ]; then
    [ "${MEGATRON_LATENT_CPU:-0}" = 1 ] || ml_log "no GPU on this node: CPU mode (gloo)"
    export MEGATRON_LATENT_CPU=1
    export CUDA_VISIBLE_DEVICES=""   # torch sees no GPU: parallel.py uses gloo + the CPU shim
    ML_DEVICE="cpu (gloo)"
  else
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # megatron TP overlap
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    ML_DEVICE="$gpus GPU(s) per node (nccl)"
    if [ "$gpus" != "$TASKS_PER_NODE" ]; then
      ml_log "warning: $TASKS_PER_NODE tasks per node but $gpus GPUs per node (one task per GPU" \
        "is intended: --ntasks-per-node = --gpus-per-node)"
    fi
  fi
  # torchrun's default; raise with --cpus-per-task (SLURM_CPUS_PER_TASK) or OMP_NUM_THREADS.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  export WANDB_MODE=${WANDB_MODE:-offline}

  # Always derived for this job: a MASTER_ADDR/PORT exported in the submitting shell (say from a
  # local torchrun) must not leak in. Deliberate overrides: ML_MASTER_ADDR / ML_MASTER_PORT.
  MASTER_ADDR=${ML_MASTER_ADDR:-}
  if [ -z "$MASTER_ADDR" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1)
    if [ -z "$MASTER_ADDR" ]; then  # the batch script runs on the job's first node
      MASTER_ADDR=${SLURMD_NODENAME:-$(hostname)}
      ml_log "warning: 'scontrol show hostnames' failed; MASTER_ADDR=$MASTER_ADDR (this node)"
    fi
  fi
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  # Deterministic per job (a requeued job keeps its id and port), below the Linux ephemeral
  # range (32768+) so it does not collide with outgoing connections, above well-known services.
  MASTER_PORT=${ML_MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 12000))}
  export MASTER_ADDR MASTER_PORT

  if [ -z "${PYTHON:-}" ]; then
    if [ -n "${CONTAINER_IMAGE:-}" ]; then PYTHON=python
    elif [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON="$REPO_DIR/.venv/bin/python"
    else PYTHON=python3
    fi
  fi
}

# Resolve a script path: as given (relative to the submit dir), else relative to the repo.
ml_resolve_script() {
  local s=$1
  if [ -f "$s" ]; then echo "$s"; return; fi
  if [ -f "$REPO_DIR/$s" ]; then echo "$REPO_DIR/$s"; return; fi
  ml_die "script not found: $s (neither in $PWD nor in $REPO_DIR)"
}

# srun options for the container, only when CONTAINER_IMAGE is set (Debian's slurm, like any
# slurm without pyxis, rejects --container-* options).
ML_CONTAINER_ARGS=()
ml_container_args() {
  ML_CONTAINER_ARGS=()
  [ -n "${CONTAINER_IMAGE:-}" ] || return 0
  local mounts="" d
  for d in "$REPO_DIR" "${SLURM_SUBMIT_DIR:-$PWD}" "${CKPT_DIR:-}" "${DATA_DIR:-}"; do
    [ -n "$d" ] || continue
    case ",$mounts," in *",$d:$d,"*) continue ;; esac
    mounts="${mounts:+$mounts,}$d:$d"
  done
  [ -z "${CONTAINER_MOUNTS:-}" ] || mounts="$mounts,$CONTAINER_MOUNTS"
  ML_CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
                     --container-workdir="${SLURM_SUBMIT_DIR:-$PWD}")
}

ml_print_summary() {
  ml_log "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST:-?}:" \
    "$NNODES node(s) x $TASKS_PER_NODE task(s) = world $WORLD, $ML_DEVICE"
  ml_log "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT repo=$REPO_DIR python=$PYTHON" \
    "container=${CONTAINER_IMAGE:-none} WANDB_MODE=$WANDB_MODE"
}

# Pre-timeout warning (#SBATCH --signal=B:USR1@...): requeue the job so that it continues from
# the newest checkpoint in CKPT_DIR. Only the batch shell gets slurm's signal (B:); it decides
# what the ranks get: SAVE_SIGNAL [USR1 when CKPT_DIR is set; "none": nothing] is first sent to
# them (srun forwards signals to its tasks): the trainer
# (megatron_latent/training/trainer.py) checkpoints at the end of the step and exits on SIGUSR1;
# the step gets SAVE_GRACE seconds [240] to end, then the job is requeued.
ML_INTERRUPTED=0
ML_SRUN_PID=""
ml_alive() { local s; s=$(ps -o stat= -p "$1" 2>/dev/null) && [ -n "$s" ] && [ "${s#Z}" = "$s" ]; }
ml_on_pre_timeout() {
  ML_INTERRUPTED=1
  local n=${SLURM_RESTART_COUNT:-0} sig=${SAVE_SIGNAL:-}
  [ -n "$sig" ] || [ -z "${CKPT_DIR:-}" ] || sig=USR1
  [ "$sig" != none ] || sig=""
  if [ -n "$sig" ] && [ -n "$ML_SRUN_PID" ] && ml_alive "$ML_SRUN_PID"; then
    local grace=${SAVE_GRACE:-240} t=0
    ml_log "pre-timeout signal: sending SIG${sig#SIG} to the ranks (checkpoint and exit)," \
      "waiting up to ${grace} s"
    kill -s "${sig#SIG}" "$ML_SRUN_PID"
    while ml_alive "$ML_SRUN_PID" && [ "$t" -lt "$grace" ]; do sleep 1; t=$((t + 1)); done
  fi
  if [ -z "${CKPT_DIR:-}" ]; then
    ml_log "pre-timeout signal: CKPT_DIR is not set, nothing to resume from: not requeueing"
  elif [ "$n" -ge "${MAX_REQUEUES:-10}" ]; then
    ml_log "pre-timeout signal: already requeued $n times (MAX_REQUEUES=${MAX_REQUEUES:-10}): not requeueing"
  else
    ml_log "pre-timeout signal at $(date '+%F %T'): requeueing job $SLURM_JOB_ID" \
      "(restart $((n + 1))); it resumes from the latest checkpoint in $CKPT_DIR"
    scontrol requeue "$SLURM_JOB_ID"
  fi
}

# Run "srun OPTS... -- CMD..." in the background and wait for it (a foreground srun would delay
# the trap until it ends). Returns srun's exit status.
ml_srun() {
  local cmd=(srun --kill-on-bad-exit=1 "${ML_CONTAINER_ARGS[@]}")
  # shellcheck disable=SC2206
  [ -z "${SRUN_EXTRA_ARGS:-}" ] || cmd+=($SRUN_EXTRA_ARGS)
  cmd+=("$@")
  ml_log "launch: ${cmd[*]}"
  if [ "${DRY_RUN:-0}" = 1 ]; then return 0; fi
  trap ml_on_pre_timeout USR1
  "${cmd[@]}" &
  local pid=$! rc
  ML_SRUN_PID=$pid
  while :; do
    ML_INTERRUPTED=0
    rc=0; wait "$pid" || rc=$?
    [ "$ML_INTERRUPTED" = 1 ] || break   # wait was cut short by the signal: wait again
  done
  trap - USR1
  return "$rc"
}
