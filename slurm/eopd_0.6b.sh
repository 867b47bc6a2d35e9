#!/bin/bash
# EOPD preset eopd_qwen3_0.6b, Megatron-Core under torchrun, 1 node(s) x 8 GPUs by default.
#   sbatch slurm/eopd_0.6b.sh [section.key=value ...]        e.g. sbatch slurm/eopd_0.6b.sh train.iterations=10 loss.tau=1.0
#   sbatch --nodes=4 slurm/eopd_0.6b.sh ...                  more nodes: the layout is resolved for the new world size
#   EOPD_DRY_RUN=1 bash slurm/eopd_0.6b.sh ...               print layout and launch command only
# Knobs (EOPD_RUN_DIR, EOPD_VENV, EOPD_HOME, GPUS_PER_NODE, NCCL_*): see slurm/common.sh.
#SBATCH --job-name=eopd-0.6b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# Find the repository first.  sbatch runs a spool copy of this file, so its own path only helps
# when run with plain bash; then the submit directory, then the path Slurm recorded at submission.
if [[ -n ${EOPD_HOME:-} ]]; then _eopd_try=("$EOPD_HOME"); else
    _eopd_cmd=$([[ -n ${SLURM_JOB_ID:-} ]] && scontrol show job "$SLURM_JOB_ID" 2>/dev/null |
        sed -n 's/^ *Command=\([^ ]*\).*/\1/p') || _eopd_cmd=""
    _eopd_try=("$(dirname -- "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-.}" "${_eopd_cmd%/*}/..")
fi
for EOPD_HOME in "${_eopd_try[@]}" ""; do [[ -f $EOPD_HOME/slurm/common.sh ]] && break; done
[[ -n $EOPD_HOME ]] || { echo "eopd: error: megatron-eopd repository not found (tried: ${_eopd_try[*]}); set EOPD_HOME=/path/to/repo" >&2; exit 1; }
EOPD_HOME=$(cd "$EOPD_HOME" && pwd -P)
# shellcheck source=slurm/common.sh
source "$EOPD_HOME/slurm/common.sh"

eopd_main cluster eopd_qwen3_0.6b "$@"
