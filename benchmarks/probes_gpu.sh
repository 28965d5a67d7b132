#!/usr/bin/env bash
# Issue 13's compute-scaling probes on one GPU: benchmarks/probes.py at 64x the quickstart SFT's samples seen, eight
# probes side by side (each its own cache, so the VAE pre-fits run in parallel; the data is generated once).
# Usage: bash benchmarks/probes_gpu.sh OUT_DIR [TRAIN_SECONDS]
set -uo pipefail
out=${1:?output dir}; secs=${2:-180}; n=${N:-4096}
mkdir -p "$out"; base=$(mktemp -d)
cat > "$base/prep.py" <<'PY'
import os, sys
from editrl.data.synth import SyntheticDataset, ensure_synthetic

if __name__ == "__main__":  # the generator's worker processes re-import this file
    os.environ["EDITRL_CACHE"] = sys.argv[1]
    opts = dict(frames=5, size=[32, 32])
    ensure_synthetic(SyntheticDataset.Options(n=int(sys.argv[2]), split="train", **opts),
                     SyntheticDataset.Options(n=32, split="eval", seed=1, **opts))
PY
python3 "$base/prep.py" "$base" "$n"
big='{"num_attention_heads": 4, "num_layers": 4, "ffn_dim": 256}'
fit="\"steps\": ${FIT_STEPS:-2000}, \"pairs\": 512, \"batch_size\": 16"
probe() {  # name, then probes.py arguments
  local name=$1; shift
  mkdir -p "$base/$name" && ln -s "$base/synthetic" "$base/$name/synthetic"
  EDITRL_CACHE="$base/$name" python3 benchmarks/probes.py "$name" --device "${DEVICE:-cuda}" --baselines --steps 100000 \
    --time-limit "$secs" --batch-size 32 --cosine --warmup 50 --set "data.train.options.n=$n" \
    --out "$out/probes.jsonl" "$@" > "$out/$name.log" 2>&1 &
}
probe g_vlm
probe g_words --tokens words
probe g_big_vlm --dit "$big"
probe g_big_words --dit "$big" --tokens words
probe g_fit_big_vlm --dit "$big" --vae "{$fit}"
probe g_fit_big_words --dit "$big" --vae "{$fit}" --tokens words
probe g_fit_t1_big_words --dit "$big" --vae "{$fit, \"temperal_downsample\": [false, false]}" --tokens words
probe g_fit_s2t1_big_words --dit "$big" --tokens words \
  --vae "{$fit, \"dim_mult\": [1, 1], \"temperal_downsample\": [false], \"scale_factor_spatial\": 2}"
wait
for f in "$base"/*/probe-vae-*/vae/prefit.json; do echo "$f"; cat "$f"; done > "$out/prefits.txt" 2>/dev/null
tail -n 4 "$out"/*.log
