#!/bin/bash
# One self-rewarding iteration on a Slurm cluster:
#
#   sbatch slurm/iteration.sh --config configs/llama2_70b.yaml --iteration 1 [key=value ...]
#   sbatch slurm/iteration.sh --run-dir runs/llama2_70b --iteration 2
#
# This small job submits the iteration as a chain of stage jobs (generate_prompts -> sample_responses
# [job array + gather] -> judge_responses [job array + gather] -> build_pairs -> train_dpo [multi-node
# srun] -> evaluate), each --dependency=afterok on the one before, and exits. Unfinished earlier
# stages (seed, M0 import, EFT, SFT) are submitted first; finished ones are skipped, so
# resubmitting after a failure or a preemption continues where the run stopped. A failing stage
# cancels its dependents. #SBATCH defaults of the stage jobs come from the config's
# executor.slurm section (override them like any key: executor.slurm.time=08:00:00).
#
# Everything is decided in Python (`selfreward slurm submit`); without arguments the environment
# is read instead: SELFREWARD_CONFIG, SELFREWARD_RUN_DIR, SELFREWARD_ITERATION, and
# SELFREWARD_PYTHON (default: python3, else python, on this node's PATH that can import
# megatron_selfreward).
#SBATCH --job-name=selfreward-iteration
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:15:00
#SBATCH --output=selfreward-iteration-%j.out
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$PWD}"
PYTHON="${SELFREWARD_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    for candidate in python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c 'import megatron_selfreward' 2>/dev/null; then
            PYTHON="$candidate"
            break
        fi
    done
fi
if [ -z "$PYTHON" ]; then
    echo "iteration.sh: on $(hostname) neither python3 nor python on PATH can import megatron_selfreward" \
         "(PATH=$PATH): set SELFREWARD_PYTHON, or load the environment before sbatch" >&2
    exit 127
fi
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    [ -n "${SELFREWARD_CONFIG:-}" ] && args+=(--config "$SELFREWARD_CONFIG")
    [ -n "${SELFREWARD_RUN_DIR:-}" ] && args+=(--run-dir "$SELFREWARD_RUN_DIR")
    [ -n "${SELFREWARD_ITERATION:-}" ] && args+=(--iteration "$SELFREWARD_ITERATION")
fi
exec "$PYTHON" -m megatron_selfreward.cli slurm submit "${args[@]}"
