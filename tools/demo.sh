#!/usr/bin/env bash
# Offline end-to-end demo (run by `make demo`, which puts the project's venv first on PATH).
# A tiny randomly initialised model only proves that the pipeline works; real use is the default
# --model_path Qwen/Qwen2.5-3B on a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
DEMO=outputs/demo
MODEL=$DEMO/tiny-qwen2
RUN=$DEMO/movie_review_model_Y
start=$(date +%s)

echo "== 1/5 tiny random Qwen2 model with the real Qwen vocabulary (offline) =="
if [ -f "$MODEL/config.json" ]; then echo "reusing $MODEL"; else python tools/make_tiny_model.py --out "$MODEL"; fi

echo; echo "== 2/5 data: chronological split and one prompt =="
python data_loader_movie_review.py example_movie_review_data.json

echo; echo "== 3/5 training (3 epochs on CPU) =="
python train_distributed_MovieReview.py \
    --data_file example_movie_review_data.json \
    --output_dir "$RUN" \
    --model_path "$MODEL" \
    --max_epochs 3 --warmup_steps 0 --learning_rate 1e-3 \
    --overwrite_output_dir

echo; echo "== 4/5 evaluation on the test split =="
python evaluate_movie_review.py --model_dir "$RUN" --max_new_tokens 32 --overwrite

echo; echo "== 5/5 a review of a new film in Y's voice =="
python generate_review.py --model_dir "$RUN" --movie 流浪地球

echo
echo "Demo finished in $(( $(date +%s) - start )) s. Outputs:"
echo "  $RUN/                 model (pytorch_model.bin), training_config.json, test_samples.json,"
echo "                        training_samples_preview.txt, loss_curve.png, checkpoint-*/"
echo "  $RUN/eval/            predictions.jsonl, metrics.json"
echo "More reviews (after: source .venv/bin/activate): python generate_review.py --model_dir $RUN --interactive"
echo "Note: the model is tiny and random: its reviews are gibberish. That proves the pipeline only."
echo "Real training: python train_distributed_MovieReview.py --data_file ... --output_dir ... on a GPU"
echo "(default --model_path Qwen/Qwen2.5-3B; see README.md)."
