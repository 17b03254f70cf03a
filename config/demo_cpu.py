# The embedded CPU demo, written out (these are also train.py's defaults): synthetic 3-digit
# additions with the column work in a <think> block, a character tokenizer and a 0.6M-parameter
# Qwen3 built from code.
#   python train.py config/demo_cpu.py && python sample.py
# batch arithmetic: 16 samples per step (batch_size 16 x 1 micro-step x 1 process); 3600 samples
# / 16 = 225 steps per epoch, x 4 epochs = 900 steps, under 3 minutes on 2 CPU cores.
out_dir = "out/demo"
init_from = "demo"
train_files = "data/demo/train.parquet"
val_files = "data/demo/test.parquet"
demo_data = True
max_length = 256
block_size = 4
block_offset = "random"
batch_size = 16
gradient_accumulation_steps = 1
learning_rate = 6e-3
min_lr = 6e-4
epochs = 4
n_layer = 4
n_embd = 128
n_head = 4
device = "cpu"
dtype = "float32"
