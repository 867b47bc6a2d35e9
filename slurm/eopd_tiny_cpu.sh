#!/bin/bash
# The tiny_cpu preset on one CPU node: the whole pipeline (rollouts, teacher scoring, EOPD update,
# checkpoint, HF export) in minutes, as a smoke test of a cluster's Slurm set-up and of this repo.
#   sbatch slurm/eopd_tiny_cpu.sh [section.key=value ...]     e.g. train.iterations=2
#   EOPD_DRY_RUN=1 bash slurm/eopd_tiny_cpu.sh ...            print layout and launch command only
# First `tools/run_tiny.py --prepare-only` builds (or reuses) the synthetic data, teacher and student in
# the run directory; then one srun step runs `torchrun --standalone --nproc_per_node=1`, so the trainer
# sees the same RANK/WORLD_SIZE/MASTER_ADDR contract as on the GPU clusters and the step is signalled,
# logged and requeued exactly like theirs.
#SBATCH --job-name=eopd-tiny
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@60
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

eopd_main tiny tiny_cpu "$@"
