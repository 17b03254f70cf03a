# The seed's recipe ("Interleaved SFT"): 4 GPUs, block size 4, max_length 2048, lr 1e-5, 512
# samples per optimizer step, 3 epochs, FSDP, bf16, gradient checkpointing.
#   torchrun --standalone --nproc_per_node=4 train.py config/seed_recipe.py \
#       --init_from=/models/Qwen3-8B --train_files=data/train.parquet
# batch arithmetic: batch_size 2 samples per micro-batch per GPU x 64 micro-steps per GPU x 4 GPUs
# = 512 samples per step. gradient_accumulation_steps counts micro-batches over all ranks
# (nanoGPT), so it is 64 x 4 = 256 here; the seed's YAML said 64 because it counted per GPU. On 8
# GPUs the same 256 gives 32 micro-steps per GPU and the same 512 samples per step.
# The seed drew the interleaved layout; split computes the same losses faster (docs/design.md,
# "The layout").
out_dir = "out/seed_recipe"
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
save_every = 1000
keep_last = 3
log_every = 10
parallel = "fsdp"
dtype = "bfloat16"
