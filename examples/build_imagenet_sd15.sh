#!/usr/bin/env bash
# Build an ImageNet(-subset) .d3m with Stable Diffusion 1.5 on GPUs.
#
# Prerequisites (once, on a machine with internet):
#   huggingface-cli download stable-diffusion-v1-5/stable-diffusion-v1-5 --revision "$REV"
#     (d3m-build resolves hub ids from the local Hugging Face cache only; copy
#      ~/.cache/huggingface/hub to offline machines, or pass a folder path)
#   an ImageFolder train split: $DATA/<wnid>/*.JPEG
#   classes.txt: one "<wnid> <name>" per line, in your teacher's class order
#   a teacher factory, e.g. my_teachers.py on PYTHONPATH:
#       def resnet18_in100():                  # logits in classes.txt order
#           m = torchvision.models.resnet18(num_classes=100)
#           m.load_state_dict(safetensors.torch.load_file("resnet18_in100.safetensors"))
#           return torch.nn.Sequential(Normalize(IMAGENET_MEAN, IMAGENET_STD), m)
#
# Settings: the Stable Diffusion defaults of builder/defaults.py (512-px 2x2
# collages, i.e. 256-px patches as in D3M's ImageNet setup; 50 DDIM steps,
# guidance 7.5; one 768-wide vector per class, 500 inversion steps at lr 2e-3,
# batch 4); `d3m-build build --help` lists them. Time per class on one GPU is
# not yet measured; expect minutes (textual inversion dominates), and check the
# log's per-stage seconds on your first classes.
set -euo pipefail
DATA=${DATA:?set DATA to the ImageFolder train directory}
REV=${REV:?set REV to the exact commit of the SD 1.5 snapshot in your cache}
OUT=${OUT:-in100_ipc10.d3m}
WORK=${WORK:-$OUT.work}          # shared by every shard (a shared filesystem), or one per machine
ARGS=(
  "$DATA" -o "$OUT" --workdir "$WORK"
  --model stable-diffusion-v1-5/stable-diffusion-v1-5 --revision "$REV"
  --teacher my_teachers:resnet18_in100 --classes classes.txt
  --ipc 10 --grid 2 --min-agreement 0.3
)

case "${1:-single}" in
  single)   # one GPU; kill and rerun at will, finished classes are kept
    d3m-build "${ARGS[@]}" ;;
  torchrun) # every GPU of this machine; each process takes classes c % WORLD_SIZE == RANK, on cuda:LOCAL_RANK
    torchrun --standalone --nproc-per-node "${GPUS:-8}" "$(command -v d3m-build)" "${ARGS[@]}" --shard auto
    d3m-build merge "$WORK" -o "$OUT" --min-agreement 0.3 ;;
  accelerate)
    accelerate launch --num_processes "${GPUS:-8}" "$(command -v d3m-build)" "${ARGS[@]}" --shard auto
    d3m-build merge "$WORK" -o "$OUT" --min-agreement 0.3 ;;
  slurm)    # sbatch --array=0-31 --gpus=1 examples/build_imagenet_sd15.sh slurm; then merge once all are done
    d3m-build "${ARGS[@]}" --shard auto ;;
  merge)    # after all shards: joins their work directories (d3m-build merge DIR0 DIR1 ... -o OUT)
    d3m-build merge "$WORK" -o "$OUT" --min-agreement 0.3 ;;
esac
