# The seed's recipe for 70B-class models (its "model.tensor_parallel_size: 4 for large models"): 4 nodes
# of 8 GPUs (80 GB), tensor parallel 8 inside each node, FSDP2 over the 4 nodes, bf16, gradient
# checkpointing, block size 4, max_length 2048, lr 1e-5, 512 samples per optimizer step, 3 epochs.
#   torchrun --nnodes=4 --nproc_per_node=8 --node_rank=$NODE_RANK --master_addr=$MASTER_ADDR \
#       --master_port=29500 train.py config/seed_recipe_70b.py --init_from=/models/Llama-3.1-70B-Instruct
#   python train.py config/seed_recipe_70b.py --init_from=... --data_only=True   # tokenize first
# batch arithmetic: 32 GPUs / tensor_parallel 8 = 4 data-parallel groups (the 8 ranks of a group read
# the same micro-batches); batch_size 2 samples per micro-batch x 256 micro-batches per step (64 per
# group) = 512 samples per step, as the 8B recipe.
# memory (docs/performance.md, Memory): 16 bytes per parameter of model and AdamW state, 1.13 TB for
# 70B, is 35 GB per GPU over 32 GPUs; with gradient checkpointing a micro-batch of 2 x 2048 tokens
# (x 1.66 with the masks) keeps ~9 GB of layer inputs: ~50 GB of 80. On 8 x 141 GB GPUs, 2 nodes:
# 71 GB of state per GPU (tensor_parallel 8 x FSDP 2).
out_dir = "out/seed_recipe_70b"
init_from = "path/to/your/model"          # the seed's model.partial_pretrain
train_files = "data/train.parquet"
val_files = None
demo_data = False
max_length = 2048
block_size = 4
layout = "split"
block_offset = "random"
batch_size = 2
gradient_accumulation_steps = 256
learning_rate = 1e-5
min_lr = 0.0
warmup_ratio = 0.05
weight_decay = 0.01
grad_clip = 1.0
epochs = 3
gradient_checkpointing = True
save_every = 200
keep_last = 2
log_every = 10
parallel = "fsdp"
tensor_parallel = 8
dtype = "bfloat16"
