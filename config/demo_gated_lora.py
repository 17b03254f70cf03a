# Gated LoRA on the CPU demo: a model trained with plain next-token SFT only (mask_loss_weight=0:
# its masks never learned, so lossless decoding accepts nothing) gets speed adapters; its own
# answers stay bit for bit.
#   python train.py --mask_loss_weight=0 --out_dir=out/demo_ar         # 1. the "existing" model
#   python train.py config/demo_gated_lora.py                           # 2. the adapters
#   python sample.py --ckpt=out/demo_ar --scenario=ar,lossless          # 1 token per forward
#   python sample.py --ckpt=out/demo_gated_lora --scenario=ar,lossless  # the same answers, faster
# Block sizes 8 and 16 (README, "Choosing block_size"): the same file with two overrides, e.g.
#   python train.py config/demo_gated_lora.py --block_size=16 --out_dir=out/demo_gated_b16
# batch arithmetic: as the demo, 16 samples per step, 225 steps per epoch, 4 epochs = 900 steps.
out_dir = "out/demo_gated_lora"
init_from = "out/demo_ar/global_step_900/huggingface"
finetune = "gated_lora"
lora_rank = 32
lora_alpha = 64.0
learning_rate = 6e-3
min_lr = 6e-4
