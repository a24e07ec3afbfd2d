# hpcllm setup: runs once in the batch step, before srun starts one task per GPU.
export HPCLLM_RUN_DIR=${run_dir}
export OMP_NUM_THREADS=${omp_threads}
export TOKENIZERS_PARALLELISM=false
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=$${NCCL_DEBUG:-WARN}
# NCCL flight recorder: a hung collective leaves each rank's last operations in logs/.
export TORCH_NCCL_TRACE_BUFFER_SIZE=$${TORCH_NCCL_TRACE_BUFFER_SIZE:-2000}
export TORCH_NCCL_DUMP_ON_TIMEOUT=$${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
export TORCH_NCCL_DEBUG_INFO_TEMP_FILE=$${TORCH_NCCL_DEBUG_INFO_TEMP_FILE:-$$HPCLLM_RUN_DIR/logs/nccl_trace_rank_}
${accelerator_env}
# NCCL defaults only: what the site (/etc/nccl.conf, modules, cluster.setup) or the user exported wins.
${nccl_env}
# Node-local scratch per job, the same path on every node: ranks compiling extensions or loading
# remote code into one shared ~/.cache lock each other out. Removed when the job ends. Extensions
# already built (prebuilt, or by an earlier run) are copied in from the usual cache, read only.
export HPCLLM_NODE_TMP=$${TMPDIR:-/tmp}/hpcllm-$$SLURM_JOB_ID
export HPCLLM_EXTENSIONS_SEED=$${TORCH_EXTENSIONS_DIR:-$$HOME/.cache/torch_extensions}
export TORCH_EXTENSIONS_DIR=$$HPCLLM_NODE_TMP/torch_extensions
export TRITON_CACHE_DIR=$$HPCLLM_NODE_TMP/triton
export HF_MODULES_CACHE=$$HPCLLM_NODE_TMP/hf_modules
# Rendezvous: first host of the allocation, and a port derived from the job id so that two jobs
# sharing a node never collide. Each task reads its rank from SLURM_PROCID (hpcllm.distributed).
export MASTER_ADDR=$$(scontrol show hostnames "$$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$$(( ${port_base} + SLURM_JOB_ID % 20000 ))
# Once per node: NCCL segments left in /dev/shm by killed jobs make the next job on the node fail at
# init; the node-local scratch above is created (before TMPDIR names it: each srun step needs it to
# exist) and seeded with built extensions (without their build locks, which a killed build leaves).
srun --ntasks-per-node=1 --ntasks=$$SLURM_JOB_NUM_NODES --overlap bash -c 'find /dev/shm -maxdepth 1 -user "$$(id -un)" -name "nccl-*" -mmin +10 -delete 2>/dev/null; mkdir -p "$$HPCLLM_NODE_TMP/tmp" "$$TORCH_EXTENSIONS_DIR"; cp -a "$$HPCLLM_EXTENSIONS_SEED/." "$$TORCH_EXTENSIONS_DIR/" 2>/dev/null; find "$$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null; true' || true
export TMPDIR=$$HPCLLM_NODE_TMP/tmp
echo "hpcllm job $$SLURM_JOB_ID on $$SLURM_JOB_NODELIST: master $$MASTER_ADDR:$$MASTER_PORT, run dir $$HPCLLM_RUN_DIR"
