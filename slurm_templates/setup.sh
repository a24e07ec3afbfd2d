# hpcllm setup: runs once in the batch step, before srun starts one task per GPU.
export HPCLLM_RUN_DIR=${run_dir}
export OMP_NUM_THREADS=${omp_threads}
export TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=$${NCCL_DEBUG:-WARN}
${accelerator_env}
${nccl_env}
# Rendezvous: first host of the allocation, and a port derived from the job id so that two jobs
# sharing a node never collide. Each task reads its rank from SLURM_PROCID (hpcllm.distributed).
export MASTER_ADDR=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$$(( ${port_base} + SLURM_JOB_ID % 20000 ))
# NCCL segments left in /dev/shm by killed jobs make the next job on the node fail at init.
srun --ntasks-per-node=1 --ntasks=$$SLURM_JOB_NUM_NODES --overlap bash -c 'find /dev/shm -maxdepth 1 -user "$$(id -un)" -name "nccl-*" -mmin +10 -delete 2>/dev/null; true' || true
echo "hpcllm job $$SLURM_JOB_ID on $$SLURM_JOB_NODELIST: master $$MASTER_ADDR:$$MASTER_PORT, run dir $$HPCLLM_RUN_DIR"
