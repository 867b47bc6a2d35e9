#!/bin/bash
# The tiny_cpu preset on CPU nodes: the whole pipeline (rollouts, teacher scoring, EOPD update,
# checkpoint, HF export) in minutes, as a smoke test of a cluster's Slurm set-up and of this repo.
#   sbatch slurm/eopd_tiny_cpu.sh [section.key=value ...]     e.g. train.iterations=2
#   sbatch --nodes=2 slurm/eopd_tiny_cpu.sh ...               one rank per node, DP = 2 over gloo
#   EOPD_DRY_RUN=1 bash slurm/eopd_tiny_cpu.sh ...            print layout and launch command only
# First `tools/run_tiny.py --prepare-only` builds (or reuses) the synthetic data, teacher and student in
# the run directory; then one srun step runs one torchrun per node with one rank each: on one node
# `torchrun --standalone`, on several a c10d rendezvous at the head node's address, as on the GPU
# clusters.  Each node starts its own vLLM engine; the step is signalled, logged and requeued exactly
# like the GPU launchers'.  Several nodes need the run directory and the venv on a shared filesystem.
#SBATCH --job-name=eopd-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
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
