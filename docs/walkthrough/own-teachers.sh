#!/usr/bin/env bash
# The README's "Your own teachers" walkthrough, run end to end on one machine (no cluster).
# Two RGB teachers of two families, packed from safetensors state dicts, amalgamated without data, scored
# on a labelled test folder (local, then in the bucket), and the same as the six-stage pipeline from S3.
#   bash docs/walkthrough/own-teachers.sh [WORKDIR]      (about 15 minutes on 2 CPU cores)
set -euo pipefail
W=${1:-/tmp/dfka-walkthrough}
BUDGET=${BUDGET:-3}
rm -rf "$W" && mkdir -p "$W"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
say() { printf '\n$ %s\n' "$*"; "$@"; }

# 0. The organisation's images, here coloured MNIST as 32x32 RGB PNGs (LABEL/IMAGE.png under train/ and test/).
say dfka data rgb mnist --out "$W/photos"

# 1. Teachers trained elsewhere. Stand-in: two trainings whose state dicts we keep as safetensors files.
say dfka teachers train --dataset "$W/photos" --labels digit_0..digit_4 --arch resnet18:0.25 --epochs 1 \
    --name upstream-a --out "$W/upstream/a"
say dfka teachers train --dataset "$W/photos" --labels digit_5..digit_9 --arch vgg:0.25 --epochs 1 \
    --name upstream-b --out "$W/upstream/b"
norm() { python3 -c "import json,sys; m=json.load(open(sys.argv[1]))['input']; print(','.join(f'{v:.4f}' for v in m[sys.argv[2]]))" "$W/upstream/$1/teacher.json" "$2"; }

# 2. Pack each state dict with its factory and label names into a bundle in the bucket, and check it.
say dfka stack up
say dfka teachers pack --arch resnet18:0.25 --weights "$W/upstream/a/weights.safetensors" \
    --labels digit_0,digit_1,digit_2,digit_3,digit_4 --input-shape 3,32,32 --mean "$(norm a mean)" --std "$(norm a std)" \
    --name shapes-a --out s3://dfka/walkthrough/teachers/shapes-a
say dfka teachers pack --arch vgg:0.25 --weights "$W/upstream/b/weights.safetensors" \
    --labels digit_5,digit_6,digit_7,digit_8,digit_9 --input-shape 3,32,32 --mean "$(norm b mean)" --std "$(norm b std)" \
    --name shapes-b --out s3://dfka/walkthrough/teachers/shapes-b
say dfka teachers show s3://dfka/walkthrough/teachers/shapes-a

# 3. The labelled test set into the bucket; amalgamate in one process and score on it.
say dfka data upload "$W/photos/test" s3://dfka/walkthrough/testsets/photos
say dfka amalgamate --teachers s3://dfka/walkthrough/teachers/shapes-a s3://dfka/walkthrough/teachers/shapes-b \
    --student resnet18:0.125 --budget-minutes "$BUDGET" --eval-dataset s3://dfka/walkthrough/testsets/photos \
    --out s3://dfka/walkthrough/targetnets/photos

# 4. The same as the six-stage pipeline (kfp.local), reading teachers and test set from the bucket.
cat > "$W/experiment.yaml" <<YAML
experiment: dfka-walkthrough
teachers: [s3://dfka/walkthrough/teachers/shapes-a, s3://dfka/walkthrough/teachers/shapes-b]
evaluation: {dataset: s3://dfka/walkthrough/testsets/photos}
amalgamation: {student: "resnet18:0.125", seed: 0, budget_minutes: $BUDGET, export: {samples: 8000}}
pipeline: {caching: false, threads: 1}
YAML
say dfka pipeline run --config "$W/experiment.yaml"
