"""Fine-tune Stable Diffusion inpainting (runwayml sd-v1-5-inpainting; its
configs/stable-diffusion/v1-inpainting-inference.yaml, kept verbatim in
tests/original_configs/v1-inpainting-inference.yaml): the released architecture exactly (the SD 1
U-Net with 9 input channels, KL-f8 autoencoder, CLIP ViT-L/14 text encoder through cross-attention,
eps-prediction, CompVis "linear" = diffusers "scaled_linear" 0.00085..0.012), on captioned images.

The U-Net input is ``[z_t, mask, masked-image latents]`` (``diffusion.concat="inpainting"``,
ldm_jax/training/concat_conditioning.py; Stability's ``LatentInpaintDiffusion`` with
``conditioning_key: hybrid``): the mask at the latent size (nearest), and the scaled first-stage
posterior sample of the image with the region to repaint set to 0 (in [-1, 1]). Each example gets a
random mask (``diffusion.inpainting_masks``: as SD-inpainting, 25% of the examples fully masked, the
others boxes or brush strokes); 10% of the captions are dropped for classifier-free guidance, the
mask and masked image never are.

Start from the released inpainting checkpoint (its U-Net starts training, its autoencoder and text
encoder are the frozen stages; init.checkpoint, ldm_jax/training/init_checkpoint.py):

    python train.py --config configs/sd_inpainting_finetune.py --workdir /ckpt/inpaint_ft \\
        --config.init.checkpoint=sd-v1-5-inpainting.ckpt \\
        --config.init.original_config=v1-inpainting-inference.yaml --config.data.path=/data/captioned_images
    python sample.py --checkpoint /ckpt/inpaint_ft --prompt "a red sofa" --init-img room.png \\
        --mask mask.png --strength 1.0
    python train.py --config configs/sd_inpainting_finetune.py:runlocal --workdir /tmp/inpaint_smoke

(a diffusers inpainting folder works as init.checkpoint too). Or make an inpainting model from a
text-to-image SD 1.x file as SD-inpainting was made ("5 additional input channels ... zero-initialized
after restoring the non-inpainting checkpoint"): ``--config.init.checkpoint=v1-5-pruned-emaonly.safetensors``
starts the U-Net from that file with its first convolution widened from 4 to 9 input channels, the file's
weights on the 4 latent channels and zeros on the mask and masked-image ones (Stability's
LatentFinetuneDiffusion.init_from_ckpt; logged). Inpainting cannot train on precomputed latents (the
masked image is encoded every step). Optimiser as the YAML: AdamW at its base_learning_rate
7.5e-5, LambdaLinearScheduler warm-up 2500 steps (the YAML's value for resuming a run; it says 10000 from
scratch), EMA 0.9999.
"""
import importlib.util
import os


def _load(name):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name)
    spec = importlib.util.spec_from_file_location("_zoo_base_" + name[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# model.unet: v1-inpainting-inference.yaml's unet_config = SD 1's with in_channels 9 (4 latents + 1 mask
# + 4 masked-image latents); checked against the released YAML by tests/test_zoo_configs.py.
def inpainting_unet(sd1):
    return dict(sd1.SD1_UNET, in_channels=9)


# diffusion.inpainting_masks: concat_conditioning.MaskConfig fields
MASKS = dict(full_prob=0.25, box_prob=0.5, max_shapes=3, box_size=(0.1, 0.7), stroke_vertices=5,
             stroke_length=(0.1, 0.4), stroke_width=(0.05, 0.2))


def get_config(arg: str = ""):
    sd1 = _load("sd1_finetune.py")
    c = sd1.sd_base(inpainting_unet(sd1), sd1.SD_VAE, sd1.CLIP_L, image_size=512, pad_token_id=49407,
                    prediction_type="epsilon")
    c.diffusion.concat = "inpainting"
    c.diffusion.inpainting_masks = dict(MASKS)
    c.train.lr = 7.5e-5               # base_learning_rate of v1-inpainting-inference.yaml
    c.train.warmup_steps = 2500       # its LambdaLinearScheduler warm_up_steps (for resuming)
    c.sample.images = ()              # image files to inpaint in the sample grids (centre box)
    c.sample.prompts = ("a red apple on a wooden table", "a vase of flowers")
    if arg == "runlocal":
        # A few-step CPU smoke run: synthetic 16x16 squares, random tiny stages as emoji_ldm's runlocal,
        # a tiny U-Net with in_channels 4 + 1 + 4.
        local = _load("emoji_ldm.py").get_config("runlocal")
        for key in ("data", "mesh", "first_stage", "text_encoder", "train", "model", "init"):
            c[key] = local[key]
        c.data.precompute_latents = False
        c.model.unet = dict(local.model.unet, in_channels=9)
        c.sample.prompts = local.sample.prompts
        c.sample.num_inference_steps = 4
        c.sample.guidance_scale = 3.0
    elif arg:
        raise ValueError(f"unknown preset {arg!r}; expected '' or 'runlocal'")
    return c
