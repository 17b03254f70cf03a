# Fine-tune a local Hugging Face model on one GPU (e.g. Qwen3-0.6B, Qwen2.5-1.5B-Instruct, an R1
# distill).
#   python train.py config/finetune_1gpu.py --init_from=/models/Qwen3-0.6B \
#       --train_files=data/gsm8k_train.parquet --val_files=data/gsm8k_test.parquet
# batch arithmetic: 4 samples per micro-batch x 16 micro-steps = 64 samples per optimizer step;
# GSM8K's 7,473 train rows make 116 steps per epoch, 348 steps in 3 epochs.
out_dir = "out/finetune_1gpu"
init_from = "path/to/a/local/hf/model"  # required: a folder with config.json, weights, tokenizer
train_files = "data/train.parquet"
val_files = None
demo_data = False
max_length = 2048
block_size = 4
batch_size = 4
gradient_accumulation_steps = 16
learning_rate = 1e-5
min_lr = 1e-6
warmup_ratio = 0.05
weight_decay = 0.01
grad_clip = 1.0
epochs = 3
gradient_checkpointing = True
save_every = 100
keep_last = 3
eval_every = 100
log_every = 10
dtype = "bfloat16"
