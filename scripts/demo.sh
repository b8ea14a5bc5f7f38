#!/usr/bin/env bash
# DeepNorm vs Post-LN on German->English Tatoeba, end to end on a CPU:
#   split -> SentencePiece -> fairseq-preprocess -> train both models in parallel
#   -> fairseq-generate -> sacreBLEU -> loss plot + summary.json
#
# Both models use exactly the same command line; the only difference is --deepnorm.
# Run it with the project's venv on PATH (`make demo` does that):
#     PATH=.venv/bin:$PATH bash scripts/demo.sh
# Every knob is an environment variable (defaults below), e.g.
#     DEMO_UPDATES=200 DEMO_LAYERS=6 DEMO_OUT=runs/quick bash scripts/demo.sh
# DEMO_STAGE=data stops after preparing the data (used by deepnet-analyze and deepnet-sweep).
# Your own corpus: DEMO_TSV=pairs.tsv (columns: target, source[, attribution]) or
#     DEMO_SRC=corpus.de DEMO_TGT=corpus.en (line-aligned plain text). See docs/demo.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd)

# ---- knobs ------------------------------------------------------------------------------------
DEMO_OUT=${DEMO_OUT:-runs/demo}                       # everything is written under here
DEMO_LAYERS=${DEMO_LAYERS:-12}                        # encoder layers = decoder layers
DEMO_UPDATES=${DEMO_UPDATES:-800}                     # training updates per model
DEMO_MAX_MINUTES=${DEMO_MAX_MINUTES:-10}              # safety cap on each model's training time
DEMO_TSV=${DEMO_TSV:-data/tatoeba-deu-eng/deu-eng.tsv.gz}
DEMO_SRC=${DEMO_SRC:-}                                # own parallel text instead of DEMO_TSV ...
DEMO_TGT=${DEMO_TGT:-}                                # ... (both, line-aligned)
DEMO_SRC_LANG=${DEMO_SRC_LANG:-de}
DEMO_TGT_LANG=${DEMO_TGT_LANG:-en}
DEMO_PAIRS=${DEMO_PAIRS:-0}                           # use only ~this many pairs (0 = all)
DEMO_VALID_PAIRS=${DEMO_VALID_PAIRS:-500}
DEMO_TEST_PAIRS=${DEMO_TEST_PAIRS:-500}
DEMO_VOCAB=${DEMO_VOCAB:-4000}                        # joint SentencePiece unigram vocabulary
DEMO_DIM=${DEMO_DIM:-64}
DEMO_FFN=${DEMO_FFN:-256}
DEMO_HEADS=${DEMO_HEADS:-4}
DEMO_MAX_TOKENS=${DEMO_MAX_TOKENS:-2000}
DEMO_LR=${DEMO_LR:-1.5e-3}
DEMO_WARMUP=${DEMO_WARMUP:-200}
DEMO_DROPOUT=${DEMO_DROPOUT:-0.2}
DEMO_LOG_INTERVAL=${DEMO_LOG_INTERVAL:-10}
DEMO_BEAM=${DEMO_BEAM:-5}
DEMO_PROGRESS_SECONDS=${DEMO_PROGRESS_SECONDS:-20}    # how often to print a progress line
DEMO_SEED=${DEMO_SEED:-1}

MODELS=(deepnorm postln)
declare -A MODEL_FLAGS=([deepnorm]="--deepnorm" [postln]="")

OUT=$DEMO_OUT
DATA=$OUT/data
PY=${PYTHON:-python}

say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in "$PY" fairseq-preprocess fairseq-train fairseq-generate; do
    command -v "$tool" >/dev/null || die "$tool not found: run 'make demo', or put .venv/bin on PATH"
done

START=$EPOCHREALTIME
mkdir -p "$OUT"

# ---- 1-3. data: split, SentencePiece, binarize (reused while the inputs are unchanged) ---------
if [[ -n $DEMO_SRC || -n $DEMO_TGT ]]; then
    [[ -n $DEMO_SRC && -n $DEMO_TGT ]] || die "DEMO_SRC and DEMO_TGT go together"
    INPUT_ARGS=(--src "$DEMO_SRC" --tgt "$DEMO_TGT")
    INPUT_FILES=("$DEMO_SRC" "$DEMO_TGT")
else
    INPUT_ARGS=(--tsv "$DEMO_TSV")
    INPUT_FILES=("$DEMO_TSV")
fi
for f in "${INPUT_FILES[@]}"; do [[ -f $f ]] || die "input file $f does not exist"; done

# The stamp covers the input bytes, the data knobs and the scripts that turn one into the other.
DATA_KEY=$(
    {
        sha256sum "${INPUT_FILES[@]}" | cut -d' ' -f1
        sha256sum scripts/split_corpus.py scripts/spm_train.py | cut -d' ' -f1
        echo "${INPUT_ARGS[*]} $DEMO_SRC_LANG $DEMO_TGT_LANG $DEMO_PAIRS $DEMO_VALID_PAIRS $DEMO_TEST_PAIRS"
        echo "$DEMO_VOCAB $DEMO_SEED"
        "$PY" -c 'from importlib.metadata import version as v; print(v("fairseq-fixed"), v("sentencepiece"))' 2>/dev/null
    } | sha256sum | cut -c1-16
)
SRC=$DEMO_SRC_LANG
TGT=$DEMO_TGT_LANG

if [[ -f $DATA/stamp && $(cat "$DATA/stamp") == "$DATA_KEY" && -f $DATA/bin/dict.$SRC.txt ]]; then
    say "data: reusing $DATA (stamp $DATA_KEY; inputs unchanged)"
else
    rm -rf "$DATA"
    mkdir -p "$DATA"
    say "1/6 split ${INPUT_FILES[*]} by $TGT sentence"
    "$PY" scripts/split_corpus.py "${INPUT_ARGS[@]}" --src-lang "$SRC" --tgt-lang "$TGT" \
        --out-dir "$DATA/text" --valid-size "$DEMO_VALID_PAIRS" --test-size "$DEMO_TEST_PAIRS" \
        --max-pairs "$DEMO_PAIRS" --seed "$DEMO_SEED"

    say "2/6 SentencePiece: joint unigram model (vocabulary ~$DEMO_VOCAB) on train.$SRC + train.$TGT"
    ENCODE=()
    for split in train valid test; do
        for lang in "$SRC" "$TGT"; do ENCODE+=("$DATA/text/$split.$lang:$DATA/spm/$split.$lang"); done
    done
    mkdir -p "$DATA/spm"
    "$PY" scripts/spm_train.py --input "$DATA/text/train.$SRC" "$DATA/text/train.$TGT" \
        --model-prefix "$DATA/spm/spm" --vocab-size "$DEMO_VOCAB" --encode "${ENCODE[@]}"

    say "3/6 fairseq-preprocess --joined-dictionary ($SRC -> $TGT)"
    fairseq-preprocess --source-lang "$SRC" --target-lang "$TGT" --joined-dictionary --workers 1 \
        --trainpref "$DATA/spm/train" --validpref "$DATA/spm/valid" --testpref "$DATA/spm/test" \
        --destdir "$DATA/bin" > "$DATA/preprocess.log" 2>&1 \
        || { tail -n 20 "$DATA/preprocess.log" >&2; die "fairseq-preprocess failed (log: $DATA/preprocess.log)"; }
    grep -E 'Dictionary|sents' "$DATA/preprocess.log" | sed 's/^.*preprocess:/  /'
    echo "$DATA_KEY" > "$DATA/stamp"
fi

if [[ ${DEMO_STAGE:-all} == data ]]; then  # deepnet-analyze / deepnet-sweep only need the data
    say "data ready: $DATA/bin"
    exit 0
fi

# ---- 4. train both models in parallel, one CPU thread each --------------------------------------
TRAIN_ARGS=(
    "$DATA/bin" --user-dir "$REPO/deepnet_fairseq" --arch deepnet_transformer
    --encoder-layers "$DEMO_LAYERS" --decoder-layers "$DEMO_LAYERS"
    --encoder-embed-dim "$DEMO_DIM" --decoder-embed-dim "$DEMO_DIM"
    --encoder-ffn-embed-dim "$DEMO_FFN" --decoder-ffn-embed-dim "$DEMO_FFN"
    --encoder-attention-heads "$DEMO_HEADS" --decoder-attention-heads "$DEMO_HEADS"
    --share-all-embeddings --dropout "$DEMO_DROPOUT"
    --criterion label_smoothed_cross_entropy --label-smoothing 0.1
    --optimizer adam --adam-betas "(0.9,0.98)" --lr "$DEMO_LR"
    --lr-scheduler inverse_sqrt --warmup-updates "$DEMO_WARMUP" --warmup-init-lr 1e-7
    --max-tokens "$DEMO_MAX_TOKENS" --max-update "$DEMO_UPDATES"
    --stop-time-hours "$(awk "BEGIN { print $DEMO_MAX_MINUTES / 60 }")"
    --seed "$DEMO_SEED" --cpu --num-workers 0
    # batch sizes need not be multiples of 8 on a CPU (fairseq main would also drop a smaller
    # last batch; the plugin restores it, see deepnet_fairseq/compat.py)
    --required-batch-size-multiple 1
    --log-format json --log-interval "$DEMO_LOG_INTERVAL" --no-progress-bar
    --no-epoch-checkpoints --no-save-optimizer-state
)
printf '%s\n' "${TRAIN_ARGS[@]}" > "$OUT/train_args.txt"

train_one() {  # NAME: writes $OUT/NAME/{train.log,exit_code,wall_seconds,checkpoints/}
    local name=$1 dir=$OUT/$1 t0=$EPOCHREALTIME rc=0
    # shellcheck disable=SC2086  # MODEL_FLAGS is a (possibly empty) flag list
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-train "${TRAIN_ARGS[@]}" ${MODEL_FLAGS[$name]} \
        --save-dir "$dir/checkpoints" > "$dir/train.log" 2>&1 || rc=$?
    echo "$rc" > "$dir/exit_code"
    awk "BEGIN { printf \"%.1f\n\", $EPOCHREALTIME - $t0 }" > "$dir/wall_seconds"
}

progress_line() {  # NAME -> "NAME: update U/N train loss L, valid loss V"
    local log=$OUT/$1/train.log train valid
    train=$(grep '| train_inner |' "$log" 2>/dev/null | tail -n 1 || true)
    valid=$(grep '| valid |' "$log" 2>/dev/null | tail -n 1 || true)
    printf '%-9s update %5s/%s  train loss %-7s valid loss %s' "$1:" \
        "$(sed -n 's/.*"num_updates": "\([0-9]*\)".*/\1/p' <<< "$train")" "$DEMO_UPDATES" \
        "$(sed -n 's/.*"loss": "\([^"]*\)".*/\1/p' <<< "$train")" \
        "$(sed -n 's/.*"valid_loss": "\([^"]*\)".*/\1/p' <<< "$valid")"
}

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
trap 'exit 130' INT TERM

say "4/6 training ${MODELS[*]} in parallel: ${DEMO_LAYERS}L-${DEMO_LAYERS}L, d=$DEMO_DIM, $DEMO_UPDATES updates" \
    "(cap ${DEMO_MAX_MINUTES} min each); logs: $OUT/<model>/train.log"
for name in "${MODELS[@]}"; do
    rm -rf "${OUT:?}/$name"
    mkdir -p "$OUT/$name"
    train_one "$name" &
    PIDS+=($!)
done
while true; do
    running=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    (( running )) || break
    for ((i = 0; i < DEMO_PROGRESS_SECONDS && running; i++)); do
        sleep 1
        running=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && running=1; done
    done
    elapsed=$(awk "BEGIN { printf \"%d\", $EPOCHREALTIME - $START }")
    printf '[%dm%02ds]' $((elapsed / 60)) $((elapsed % 60))
    for name in "${MODELS[@]}"; do printf '  %s |' "$(progress_line "$name")"; done
    echo
done
for pid in "${PIDS[@]}"; do wait "$pid" || true; done
PIDS=()

TRAINED=()
for name in "${MODELS[@]}"; do
    rc=$(cat "$OUT/$name/exit_code")
    if [[ $rc == 0 ]]; then
        TRAINED+=("$name")
    elif grep -q -E 'FloatingPointError|Nan/Inf|nan' "$OUT/$name/train.log"; then
        echo "$name: training stopped on a NaN/Inf (diverged); see $OUT/$name/train.log"
        [[ -f $OUT/$name/checkpoints/checkpoint_last.pt ]] && TRAINED+=("$name")
    else
        tail -n 25 "$OUT/$name/train.log" >&2
        die "fairseq-train failed for $name (exit $rc; log: $OUT/$name/train.log)"
    fi
done

# ---- 5. translate the test set (both models in parallel) and score with sacreBLEU ---------------
say "5/6 fairseq-generate on test (beam $DEMO_BEAM) and sacreBLEU against the raw $TGT references"
for name in "${TRAINED[@]}"; do
    OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-generate "$DATA/bin" --user-dir "$REPO/deepnet_fairseq" \
        --path "$OUT/$name/checkpoints/checkpoint_last.pt" --gen-subset test --source-lang "$SRC" \
        --target-lang "$TGT" --beam "$DEMO_BEAM" --batch-size 64 --required-batch-size-multiple 1 --max-len-a 1.5 --max-len-b 10 \
        --remove-bpe sentencepiece --cpu --num-workers 0 \
        > "$OUT/$name/generate.out" 2> "$OUT/$name/generate.log" &
    PIDS+=($!)
done
for i in "${!PIDS[@]}"; do
    wait "${PIDS[$i]}" || { tail -n 20 "$OUT/${TRAINED[$i]}/generate.log" >&2; die "fairseq-generate failed for ${TRAINED[$i]}"; }
done
PIDS=()
for name in "${TRAINED[@]}"; do
    "$PY" scripts/score_bleu.py --name "$name" --generate-log "$OUT/$name/generate.out" \
        --reference "$DATA/text/test.$TGT" --hyp-out "$OUT/$name/test.hyp.$TGT" --json "$OUT/$name/bleu.json"
done

# ---- 6. report: loss plot, summary.json, example translations -----------------------------------
say "6/6 report"
"$PY" scripts/demo_report.py --out "$OUT" --models "${MODELS[@]}" --layers "$DEMO_LAYERS" \
    --updates "$DEMO_UPDATES" --source "$DATA/text/test.$SRC" --reference "$DATA/text/test.$TGT" \
    --total-seconds "$(awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $START }")"
