"""Settings shared by the tests that train: a tiny U-Net on the 8x8 digits at 16 px, for seconds."""

TINY = dict(
    preset="tiny",
    data="digits",
    image_size=16,
    batch_size=8,
    sample_every=0,
    checkpoint_every=0,
    tensorboard=False,
    preview_images=4,
    preview_steps=3,
    log_every=1,
    warmup_steps=2,
    threads="2",  # bit-exact resume needs one thread count
)
