"""The tiny DINO training run the training tests share: 6 iterations of a 2-block ViT on 64 synthetic fields."""

TINY_DINO = [
    "student.arch=vit_test", "student.patch_size=8", "student.n_storage_tokens=1", "student.in_chans=5",
    "crops.global_crops_size=32", "crops.local_crops_size=16", "crops.local_crops_number=2",
    "dino.head_n_prototypes=64", "ibot.head_n_prototypes=64", "dino.head_hidden_dim=32", "ibot.head_hidden_dim=32",
    "dino.head_bottleneck_dim=16", "ibot.head_bottleneck_dim=16",
    "train.dataset_path=SyntheticCellPainting:size=64:image_size=64", "train.batch_size_per_gpu=4",
    "train.num_workers=0", "train.OFFICIAL_EPOCH_LENGTH=2", "optim.epochs=3", "optim.warmup_epochs=1",
    "teacher.warmup_teacher_temp_epochs=1", "train.log_every=1", "checkpointing.period=3",
    "evaluation.eval_period_iterations=2",
]
