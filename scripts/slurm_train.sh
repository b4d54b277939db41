#!/bin/bash
# Multi-node training with torchrun's c10d rendezvous under Slurm: one torchrun agent per node,
# GPUS_PER_NODE processes each; rank 0 writes the run folder, each rank reads its share of the
# images (folder or shards). Submit from the repository root:
#   sbatch --nodes 4 scripts/slurm_train.sh configs/imagenet/singh_at_convnext_t_convstem.yaml \
#       data.root=/data/imagenet
# Resume after a crash or a time limit (inside an epoch too, with train.checkpoint_steps):
#   sbatch --nodes 4 scripts/slurm_train.sh --resume checkpoints/singh_at_convnext_t_convstem
# The node count may change on resume as long as it divides train.batch_size (with
# train.accumulate); the batches, and so the result, then follow the new split.
#SBATCH --job-name=advgkl
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%j.out
set -euo pipefail
GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT="${RDZV_PORT:-29500}"
if [ "${1:-}" = "--resume" ]; then ARGS=(train --resume "$2"); else ARGS=(train "$@"); fi
srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node="$GPUS_PER_NODE" \
    --rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" \
    -m advgkl "${ARGS[@]}"
