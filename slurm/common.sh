# shellcheck shell=bash
# Shared body of the slurm/eopd_*.sh launchers: sourced by them, never run on its own.
#
# A launcher finds the repository, sources this file and calls
#     eopd_main cluster|tiny PRESET "$@"
# which, in order:
#   1. checks the arguments, enters the repository and activates its venv;
#   2. prints the job and the trainer's resolved layout (`train_eopd.py --dry-run --world-size N`
#      with the same overrides) - a configuration the trainer rejects stops here, before any GPU
#      time is spent;
#   3. prints the exact launch command and, with EOPD_DRY_RUN=1, exits 0 there;
#   4. runs it as one srun step (one task per node, torchrun inside), requeueing the job when Slurm
#      sends the pre-timeout signal (USR1, from `#SBATCH --signal=B:USR1@...`).  The trainer
#      resumes from the run directory's latest checkpoint by itself.
#
# Environment knobs (all optional):
#   EOPD_HOME       repository root (otherwise found from the script / submit directory)
#   EOPD_VENV       venv to use (otherwise <repo>/.venv when it exists, else python3 on PATH)
#   EOPD_RUN_DIR    run directory (default <submit dir>/runs/<preset>-<job name>)
#   EOPD_PRESET     a preset name or YAML path replacing the launcher's preset
#   EOPD_DRY_RUN=1  print layout and command, launch nothing
#   EOPD_TINY_PREPARE_ARGS  (tiny only) extra tools/run_tiny.py flags, e.g. "--teacher-sft-iterations 20"
#   EOPD_RDZV_PORT  torchrun rendezvous port on the head node (default 20000 + job id % 10000)
#   EOPD_RDZV_JOIN_TIMEOUT_S  how long torchrun waits for every node to join (default 300)
#   EOPD_COLLECTIVE_TIMEOUT_S how long a rank waits in one collective before failing (default 600;
#                   a rank whose peer process died fails at once, this bounds a peer that hangs)
#   GPUS_PER_NODE   processes per node (default: Slurm's GPU count for the node, else 8)
#   NCCL_*, GLOO_SOCKET_IFNAME, OMP_NUM_THREADS, CUDA_DEVICE_MAX_CONNECTIONS: respected when set
#                   (srun passes the whole environment to every node).
#
# Several nodes: one srun task per node runs one torchrun, which joins a c10d rendezvous at the head
# node's address (its Slurm NodeAddr) on EOPD_RDZV_PORT; the run directory and the venv must be on a
# filesystem every node sees.

eopd_log() { printf '[eopd %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
eopd_die() { printf 'eopd: error: %s\n' "$*" >&2; exit 1; }

# The hosts of a Slurm node list, one a line ("gpu[07-08],cpu3" -> gpu07 gpu08 cpu3).  scontrol
# knows every form; the bash fallback covers prefix[ranges] items where scontrol cannot run (dry
# runs off-cluster).
eopd_hostnames() {
    local list=$1 out
    if out=$(scontrol show hostnames "$list" 2>/dev/null) && [[ -n $out ]]; then
        printf '%s\n' "$out"
        return
    fi
    local -a items=() parts=()
    local cur="" depth=0 ch k item prefix part lo hi n
    for ((k = 0; k < ${#list}; k++)); do  # split at the commas outside brackets
        ch=${list:k:1}
        [[ $ch == "[" ]] && depth=1
        [[ $ch == "]" ]] && depth=0
        if [[ $ch == , && $depth == 0 ]]; then items+=("$cur"); cur=""; else cur+=$ch; fi
    done
    items+=("$cur")
    for item in "${items[@]}"; do
        if [[ $item =~ ^([^][]*)\[([0-9,-]+)\]$ ]]; then
            prefix=${BASH_REMATCH[1]}
            IFS=, read -r -a parts <<<"${BASH_REMATCH[2]}"
            for part in "${parts[@]}"; do
                lo=${part%-*} hi=${part#*-}
                for ((n = 10#$lo; n <= 10#$hi; n++)); do printf '%s%0*d\n' "$prefix" "${#lo}" "$n"; done
            done
        elif [[ -n $item ]]; then
            printf '%s\n' "$item"
        fi
    done
}

# The first host of a Slurm node list ("gpu[07-08,11],cpu3" -> "gpu07").
eopd_head_node() {
    local first
    first=$(eopd_hostnames "$1" | awk 'NR == 1')
    [[ -n $first ]] || eopd_die "cannot read a head node from SLURM_JOB_NODELIST='$1'"
    printf '%s\n' "$first"
}

# The address the other nodes reach NODE on: its Slurm NodeAddr (the name itself where scontrol
# cannot say, e.g. dry runs off-cluster, or where NodeAddr is the name).
eopd_node_addr() {
    local node=$1 addr
    addr=$(scontrol show node "$node" 2>/dev/null | sed -n 's/^ *NodeAddr=\([^ ]*\).*/\1/p' | head -n 1) || addr=""
    printf '%s\n' "${addr:-$node}"
}

# Shell-quoted, space-separated: a command line that can be pasted back into a shell.
_eopd_quote() { local s; s=$(printf '%q ' "$@"); printf '%s' "${s% }"; }

_eopd_is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }
_eopd_is_posint() { [[ $1 =~ ^[0-9]+$ ]] && (($1 > 0)); }

_eopd_on_requeue_signal() {
    _EOPD_REQUEUED=1
    eopd_log "pre-timeout signal: requeueing job $_EOPD_JOB_ID (restart ${SLURM_RESTART_COUNT:-0});" \
        "the next run resumes from $RUN_DIR/checkpoints"
    scontrol requeue "$_EOPD_JOB_ID" || eopd_log "WARNING: scontrol requeue failed; the job will time out"
}

eopd_main() {
    local mode=$1 preset=${EOPD_PRESET:-$2}
    shift 2
    [[ $mode == cluster || $mode == tiny ]] || eopd_die "eopd_main: mode must be cluster or tiny, got '$mode'"
    [[ -n $preset ]] || eopd_die "no preset given"

    local arg
    for arg in "$@"; do
        case $arg in
            run.dir=*) eopd_die "set the run directory with EOPD_RUN_DIR=..., not '$arg' (the logs and the resume check follow it)" ;;
            --config | --config=* | --dry-run | --world-size | --world-size=*)
                eopd_die "'$arg' is set by the launcher; pass only section.key=value overrides (or EOPD_PRESET=...)" ;;
        esac
    done

    local dry_run=${EOPD_DRY_RUN:-0}
    if [[ -z ${SLURM_JOB_ID:-} && $dry_run != 1 ]]; then
        eopd_die "not inside a Slurm job: submit with 'sbatch $0 [overrides]' (EOPD_DRY_RUN=1 previews without Slurm)"
    fi

    _EOPD_JOB_ID=${SLURM_JOB_ID:-0}
    local nnodes=${SLURM_NNODES:-1} job_name=${SLURM_JOB_NAME:-local}
    local nodelist=${SLURM_JOB_NODELIST:-$(hostname -s)}
    local nproc
    if [[ $mode == cluster ]]; then
        nproc=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    else
        nproc=1
    fi
    _eopd_is_posint "$nnodes" || eopd_die "SLURM_NNODES='$nnodes' is not a node count"
    _eopd_is_posint "$nproc" || eopd_die "GPUS_PER_NODE='$nproc' is not a positive integer"
    _eopd_is_uint "$_EOPD_JOB_ID" || eopd_die "SLURM_JOB_ID='$_EOPD_JOB_ID' is not numeric"
    local world_size=$((nnodes * nproc))

    local submit_dir=${SLURM_SUBMIT_DIR:-$PWD}
    cd "$EOPD_HOME" || eopd_die "cannot enter $EOPD_HOME"
    [[ -f tools/train_eopd.py ]] || eopd_die "trainer not found: $EOPD_HOME/tools/train_eopd.py (is EOPD_HOME the megatron-eopd repository?)"
    if [[ $mode == tiny ]]; then
        [[ -f tools/run_tiny.py ]] || eopd_die "not found: $EOPD_HOME/tools/run_tiny.py"
    fi

    # -- Python environment -------------------------------------------------------------------
    local venv=""
    if [[ -n ${EOPD_VENV:-} ]]; then
        [[ -x $EOPD_VENV/bin/python ]] || eopd_die "EOPD_VENV=$EOPD_VENV has no bin/python"
        venv=$(cd "$EOPD_VENV" && pwd -P)
    elif [[ -x .venv/bin/python ]]; then
        venv=$EOPD_HOME/.venv
    fi
    if [[ -n $venv ]]; then
        export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH
    fi
    local py torchrun
    py=$(command -v python3 || command -v python) || eopd_die "no python3 on PATH (set EOPD_VENV)"
    torchrun=$(dirname "$py")/torchrun
    [[ -x $torchrun ]] || torchrun=$(command -v torchrun) || eopd_die "torchrun not found next to $py or on PATH"

    # -- run directory ----------------------------------------------------------------------------
    local run_name=${preset##*/}
    run_name=${run_name%.yaml}
    run_name=${run_name%.yml}
    RUN_DIR=${EOPD_RUN_DIR:-$submit_dir/runs/$run_name-$job_name}
    [[ $RUN_DIR == /* ]] || RUN_DIR=$submit_dir/$RUN_DIR

    # -- process environment --------------------------------------------------------------------
    local cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
    local threads=$((cpus / nproc))
    ((threads > 0)) || threads=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
    export PYTHONUNBUFFERED=1
    # A rank blocked in a collective on a peer that hangs fails after this (the trainer reads it).
    export EOPD_COLLECTIVE_TIMEOUT_S=${EOPD_COLLECTIVE_TIMEOUT_S:-600}
    local join_timeout=${EOPD_RDZV_JOIN_TIMEOUT_S:-300}
    _eopd_is_posint "$join_timeout" || eopd_die "EOPD_RDZV_JOIN_TIMEOUT_S='$join_timeout' is not a positive integer"
    _eopd_is_posint "$EOPD_COLLECTIVE_TIMEOUT_S" || eopd_die "EOPD_COLLECTIVE_TIMEOUT_S='$EOPD_COLLECTIVE_TIMEOUT_S' is not a positive integer"
    if [[ $mode == cluster ]]; then
        # Megatron's TP communication overlap needs kernels queued in issue order.
        export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
        export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
        # A failed or hung collective aborts the process (and the job) instead of hanging it.
        export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
        export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
        # NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ... are the cluster's business: exported values pass through.
    fi

    # -- commands ---------------------------------------------------------------------------------
    local head="" head_addr="" port=""
    # The trainer's configuration: preset, run directory, (tiny) the prepared assets, then the user's.
    local -a config=(--config "$preset" "run.dir=$RUN_DIR")
    if [[ $mode == tiny ]]; then
        # As tools/run_tiny.py trains it: the models it prepared in this run directory.
        config+=("student.hf_dir=$RUN_DIR/assets/student_base" "teacher.hf_dir=$RUN_DIR/assets/teacher")
    fi
    config+=("$@")
    local -a trainer=(tools/train_eopd.py "${config[@]}")
    local resume_note="fresh run"
    if [[ -f $RUN_DIR/checkpoints/latest ]]; then
        trainer+=(--resume)
        resume_note="resuming: $RUN_DIR/checkpoints/latest -> $(<"$RUN_DIR/checkpoints/latest")"
    fi
    local -a srun_cmd=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
    # Since Slurm 22.05 a step no longer inherits the job's --cpus-per-task: pass it on.
    [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    srun_cmd+=(--open-mode=append --output="$RUN_DIR/logs/train-%j-node%n.log")
    local -a prepare=() launch node_cmd
    if [[ $mode == cluster || $nnodes -gt 1 ]]; then
        # One torchrun per node, all joining a rendezvous hosted by the head node's torchrun.
        head=$(eopd_head_node "$nodelist")
        head_addr=$(eopd_node_addr "$head")
        port=${EOPD_RDZV_PORT:-$((20000 + _EOPD_JOB_ID % 10000))}
        _eopd_is_posint "$port" || eopd_die "EOPD_RDZV_PORT='$port' is not a port number"
        node_cmd=("$torchrun" --nnodes="$nnodes" --nproc_per_node="$nproc"
            --rdzv_id="$_EOPD_JOB_ID" --rdzv_backend=c10d --rdzv_endpoint="$head_addr:$port"
            --rdzv_conf=join_timeout="$join_timeout" "${trainer[@]}")
    else
        node_cmd=("$torchrun" --standalone --nnodes=1 --nproc_per_node=1 "${trainer[@]}")
    fi
    launch=("${srun_cmd[@]}" "${node_cmd[@]}")
    if [[ $mode == tiny ]]; then
        # EOPD_TINY_PREPARE_ARGS: extra run_tiny.py flags, e.g. smaller SFT budgets for smoke tests.
        local -a prepare_extra=()
        read -r -a prepare_extra <<<"${EOPD_TINY_PREPARE_ARGS:-}"
        prepare=("$py" tools/run_tiny.py --prepare-only --run-dir "$RUN_DIR" "${prepare_extra[@]}")
    fi

    # -- 1. who and where ---------------------------------------------------------------------------
    eopd_log "job ${_EOPD_JOB_ID} ($job_name), restart ${SLURM_RESTART_COUNT:-0}, preset $preset, mode $mode"
    eopd_log "nodes: $nnodes ($nodelist), processes per node: $nproc, world size: $world_size${head:+, rendezvous $head ($head_addr:$port)}"
    eopd_log "repository: $EOPD_HOME, python: $py${venv:+ (venv $venv)}"
    eopd_log "run directory: $RUN_DIR ($resume_note)"
    eopd_log "env: OMP_NUM_THREADS=$OMP_NUM_THREADS${NCCL_DEBUG:+ NCCL_DEBUG=$NCCL_DEBUG}" \
        "${CUDA_DEVICE_MAX_CONNECTIONS:+CUDA_DEVICE_MAX_CONNECTIONS=$CUDA_DEVICE_MAX_CONNECTIONS}" \
        "${TORCH_NCCL_ASYNC_ERROR_HANDLING:+TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING}" \
        "${GLOO_SOCKET_IFNAME:+GLOO_SOCKET_IFNAME=$GLOO_SOCKET_IFNAME}" "${NCCL_SOCKET_IFNAME:+NCCL_SOCKET_IFNAME=$NCCL_SOCKET_IFNAME}" \
        "EOPD_COLLECTIVE_TIMEOUT_S=$EOPD_COLLECTIVE_TIMEOUT_S"

    local rc=0
    if [[ $dry_run != 1 ]]; then
        _EOPD_REQUEUED=0
        trap _eopd_on_requeue_signal USR1
        mkdir -p "$RUN_DIR/logs"
        printf '%s job=%s restart=%s nodes=%s launch=%s\n' "$(date -Is)" "$_EOPD_JOB_ID" \
            "${SLURM_RESTART_COUNT:-0}" "$nodelist" "$(_eopd_quote "${launch[@]}")" >>"$RUN_DIR/logs/jobs.log"
        if ((${#prepare[@]})); then
            # Before the layout: the trainer reads the prepared models' config.json to resolve it.
            eopd_log "preparing the tiny assets (cached in the run directory): $(_eopd_quote "${prepare[@]}")"
            "${prepare[@]}" || eopd_die "asset preparation failed (exit $?)"
        fi
    fi

    # -- 2. the layout, from the trainer itself -------------------------------------------------
    if [[ $mode == tiny && $dry_run == 1 && ! -f $RUN_DIR/assets/student_base/config.json ]]; then
        eopd_log "layout: not resolved - the tiny models are not prepared in $RUN_DIR/assets yet" \
            "(the job prepares them first, then prints the layout)"
    else
        echo "===== resolved layout (train_eopd.py --dry-run --world-size $world_size) ====="
        "$py" tools/train_eopd.py "${config[@]}" --dry-run --world-size "$world_size" || rc=$?
        echo "===== end of layout ====="
        ((rc == 0)) || eopd_die "the trainer rejected this configuration (dry run exit $rc, message above); nothing launched"
    fi

    # -- 3. the command -------------------------------------------------------------------------------
    echo "===== launch command ====="
    ((${#prepare[@]} == 0)) || printf 'prepare: %s\n' "$(_eopd_quote "${prepare[@]}")"
    printf 'launch: %s\n' "$(_eopd_quote "${launch[@]}")"
    # What srun starts on each node: the same torchrun everywhere; the rendezvous assigns node ranks
    # (0..nnodes-1, in join order) and global ranks node_rank*nproc .. +nproc-1.
    local -a hosts=()
    mapfile -t hosts < <(eopd_hostnames "$nodelist")
    ((${#hosts[@]} == nnodes)) || hosts=()
    local i
    for ((i = 0; i < ${#hosts[@]}; i++)); do
        printf 'node %s: %s (%s)%s: %s\n' "$i" "${hosts[i]}" "$(eopd_node_addr "${hosts[i]}")" \
            "$([[ ${hosts[i]} == "$head" ]] && echo ', hosts the rendezvous')" "$(_eopd_quote "${node_cmd[@]}")"
    done
    echo "===== end of launch command ====="
    if [[ $dry_run == 1 ]]; then
        eopd_log "EOPD_DRY_RUN=1: nothing launched"
        exit 0
    fi

    # -- 4. run -------------------------------------------------------------------------------------------
    eopd_log "launching; trainer output: $RUN_DIR/logs/train-${_EOPD_JOB_ID}-node<N>.log"
    "${launch[@]}" &
    local pid=$!
    # `wait` returns early when the trap fires; keep waiting until the step has really ended.
    while :; do
        rc=0
        wait "$pid" || rc=$?
        kill -0 "$pid" 2>/dev/null || break
    done
    if ((_EOPD_REQUEUED)); then
        eopd_log "step ended (exit $rc) after the requeue request; Slurm restarts the job"
        exit 0
    fi
    eopd_log "training step finished with exit code $rc"
    exit "$rc"
}
