#!/usr/bin/env bash
# Build an ImageNet(-subset) .d3m with Stable Diffusion 1.5 on GPUs.
#
# Prerequisites (once, on a machine with internet):
#   the model, only the files rendering loads (the archive pins exactly these; a full
#   snapshot pins the same identity, it is only larger):
#     hf download stable-diffusion-v1-5/stable-diffusion-v1-5 --revision "$REV" \
#       model_index.json scheduler/scheduler_config.json \
#       unet/config.json unet/diffusion_pytorch_model.safetensors \
#       vae/config.json vae/diffusion_pytorch_model.safetensors \
#       text_encoder/config.json text_encoder/model.safetensors \
#       tokenizer/merges.txt tokenizer/special_tokens_map.json tokenizer/tokenizer_config.json tokenizer/vocab.json
#     (or the *.fp16.safetensors files with VARIANT=fp16: half the download; the archive records the
#      variant, and consumers render those weights). d3m-build resolves hub ids from the local
#     Hugging Face cache only; copy ~/.cache/huggingface/hub to offline machines, or pass a folder.
#     SDXL and single-file checkpoints (v1-5-pruned-emaonly.safetensors) are refused before any
#     work, the latter with the command that converts it to a diffusers folder.
#   an ImageFolder train split: $DATA/<wnid>/*.JPEG
#   classes.txt: one "<wnid> <name>" per line, in your teacher's class order
#   a teacher factory, e.g. my_teachers.py on PYTHONPATH:
#       def resnet18_in100():                  # logits in classes.txt order
#           m = torchvision.models.resnet18(num_classes=100)
#           m.load_state_dict(safetensors.torch.load_file("resnet18_in100.safetensors"))
#           return torch.nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), m)
#
# Settings: the Stable Diffusion defaults of builder/settings.py (512-px 2x2 collages, i.e.
# 256-px patches as in D3M's ImageNet setup; 50 DDIM steps, guidance 7.5; one 768-wide vector
# per class, 500 inversion steps at lr 2e-3, batch 4); `d3m-build build --help` lists them.
# DTYPE: the frozen model's dtype for inversion and labelling (float16 by default on CUDA;
# bfloat16 on GPUs that have it). Time per class on one GPU is not yet measured; expect
# minutes (textual inversion dominates), and check the log's per-stage seconds.
#
# Scale-out: every rank builds classes c % WORLD_SIZE == RANK on cuda:LOCAL_RANK into the
# one work directory. The preflight (every image the build reads decoded once, the file
# listing, the class-order check) runs once per build: the first rank computes it into
# $WORK/preflight.json, the others wait and reuse it, and so does every restart. A class
# below --min-agreement is recorded and reported by its rank, which goes on with the others;
# the threshold is enforced once, at the merge, which names those classes (merge without
# --min-agreement to accept them). Rerun a killed job with the same command: finished classes
# are kept.
set -euo pipefail
DATA=${DATA:?set DATA to the ImageFolder train directory}
REV=${REV:?set REV to the exact commit of the SD 1.5 snapshot in your cache}
OUT=${OUT:-in100_ipc10.d3m}
WORK=${WORK:-$OUT.work}          # shared by every shard (a shared filesystem), or one per machine
MIN_AGREEMENT=${MIN_AGREEMENT:-0.3}
ARGS=(
  "$DATA" -o "$OUT" --workdir "$WORK"
  --model stable-diffusion-v1-5/stable-diffusion-v1-5 --revision "$REV"
  --teacher my_teachers:resnet18_in100 --classes classes.txt
  --ipc 10 --grid 2 --min-agreement "$MIN_AGREEMENT"
)
if [[ -n "${VARIANT:-}" ]]; then ARGS+=(--variant "$VARIANT"); fi
if [[ -n "${DTYPE:-}" ]]; then ARGS+=(--dtype "$DTYPE"); fi

case "${1:-single}" in
  single)   # one GPU; kill and rerun at will, finished classes are kept; writes $OUT at the end
    d3m-build "${ARGS[@]}" ;;
  torchrun) # every GPU of this machine; each process takes classes c % WORLD_SIZE == RANK, on cuda:LOCAL_RANK
    torchrun --standalone --nproc-per-node "${GPUS:-8}" -m builder.cli "${ARGS[@]}" --shard auto
    d3m-build merge "$WORK" -o "$OUT" --min-agreement "$MIN_AGREEMENT" ;;
  accelerate)
    accelerate launch --num_processes "${GPUS:-8}" -m builder.cli "${ARGS[@]}" --shard auto
    d3m-build merge "$WORK" -o "$OUT" --min-agreement "$MIN_AGREEMENT" ;;
  slurm)    # sbatch --array=0-31 --gpus=1 examples/build_imagenet_sd15.sh slurm; then merge once all are done
    d3m-build "${ARGS[@]}" --shard auto ;;
  merge)    # after all shards: joins their work directories (d3m-build merge DIR0 DIR1 ... -o OUT)
    d3m-build merge "$WORK" -o "$OUT" --min-agreement "$MIN_AGREEMENT" ;;
esac
